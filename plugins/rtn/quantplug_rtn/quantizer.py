"""``RtnQuantizer`` and ``RtnLinear``: round-to-nearest quantization with packed storage.

Storage of one ``RtnLinear`` (``out`` x ``in`` weight, ``g`` = group size, ``G`` = groups per row):
    qweight  uint8 [out, ceil(G*g*bits/8)]  codes 0..2**bits-1, packed low bits first
    scale    weight dtype [out, G]
    zero     [out, G]                       asymmetric only, see below
    bias     weight dtype [out]             (if the layer has one)
The input dimension is padded up to a multiple of ``g``, so every layer shape works.

Dequantized weight, per group:
- symmetric (no ``zero``): (code - 2**(bits-1)) * scale, codes 1..2**bits-1, scale = absmax / (2**(bits-1) - 1).
- asymmetric: code * scale + zero, with ``zero`` in the weight dtype: the min/max affine quantizer
  GGUF's Q4_1 and HQQ's initialisation use. ``zero`` is the group's minimum (the weight code 0
  dequantizes to, a zero point in the float domain, as torchao's ``ZeroPointDomain.FLOAT``),
  scale = (max - min) / (2**bits - 1), code = round((w - min) / scale). A group lying on such a grid
  is reproduced; a constant group has scale 0 and code 0 everywhere, and reproduces exactly.
- asymmetric, checkpoints written before the min/max layout (``zero`` is uint8): (code - zero) * scale,
  ``zero`` being the integer code that dequantizes to 0. Such checkpoints still load and compute
  exactly what they did; quantizing never writes this layout again. The dtype of ``zero`` tells the
  two apart (the tensor names are the same: the core checks a checkpoint's tensor names against
  ``expected_tensors``, which cannot see the checkpoint, so a layout with other names would be
  refused before ``load_module`` could recognise it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import quantplug

from .config import RtnConfig
from .fused import FusedRtnLinear, to_fused


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) along the last dim, 8/bits per byte, low bits first."""
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = F.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``n`` codes of each row."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


class RtnLinear(nn.Module):
    """A Linear layer whose weight is stored as packed round-to-nearest codes; dequantized on forward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.group_size = in_features if group_size == -1 else group_size
        groups = math.ceil(in_features / self.group_size)
        packed = math.ceil(groups * self.group_size * bits / 8)
        self.register_buffer("qweight", torch.empty(out_features, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=dtype, device=device))
        zero = None if symmetric else torch.empty(out_features, groups, dtype=dtype, device=device)
        self.register_buffer("zero", zero)  # None (symmetric) is not part of the state dict
        bias_data = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if bias_data is None else nn.Parameter(bias_data, requires_grad=False)

    @classmethod
    def like(cls, linear: nn.Linear, config: RtnConfig) -> RtnLinear:
        """An uninitialized ``RtnLinear`` with ``linear``'s shape, bias, dtype and device (meta: meta)."""
        return cls(
            linear.in_features,
            linear.out_features,
            bits=config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: RtnConfig) -> RtnLinear:
        """Quantize ``linear``'s weight by round-to-nearest, per group of ``group_size`` inputs."""
        q = cls.like(linear, config)
        w = linear.weight.detach()
        out_f, in_f = w.shape
        g, levels = q.group_size, (1 << config.bits) - 1
        pad = q.scale.shape[1] * g - in_f
        if config.symmetric:  # codes 1..levels, centred on 2**(bits-1); zero padding leaves absmax alone
            wg = F.pad(w.float(), (0, pad)).reshape(out_f, -1, g)
            qmax = (1 << (config.bits - 1)) - 1
            scale = (wg.abs().amax(dim=-1) / qmax).clamp_min(1e-12).to(w.dtype)
            codes = (torch.round(wg / scale.float().unsqueeze(-1)) + (qmax + 1)).clamp(1, levels)
        else:  # min/max affine, codes 0..levels; padding repeats the row's last weight (min/max unchanged)
            wg = F.pad(w.float(), (0, pad), mode="replicate").reshape(out_f, -1, g)
            wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
            scale = ((wmax - wmin) / levels).to(w.dtype)
            q.zero.copy_(wmin)  # an element of w: exact in the weight dtype
            # codes from the stored (weight-dtype) scale and zero, which dequantize() multiplies and
            # adds; a constant group (scale 0, also one whose step underflows the dtype) is all code 0,
            # so it dequantizes to exactly its value, with no division by 0
            step = scale.float().unsqueeze(-1)
            shifted = wg - q.zero.float().unsqueeze(-1)
            codes = torch.round(shifted / torch.where(step > 0, step, 1.0)).clamp(0, levels)
        q.qweight.copy_(pack(codes.reshape(out_f, -1).to(torch.uint8), config.bits))
        q.scale.copy_(scale)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def codes(self) -> torch.Tensor:
        """The unpacked codes, uint8 [out, groups * group_size] (the padded input dimension)."""
        return unpack(self.qweight, self.bits, self.scale.shape[1] * self.group_size)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, like
    ) -> RtnLinear:
        """A symmetric layer of ``like``'s shape holding ``codes`` [out, padded in] and ``scale``."""
        q = cls(
            like.in_features,
            like.out_features,
            bits=like.bits,
            group_size=like.group_size,
            symmetric=True,
            bias=bias is not None,
            dtype=scale.dtype,
            device=scale.device,
        )
        q.qweight.copy_(pack(codes, like.bits))
        q.scale.copy_(scale)
        if bias is not None:
            q.bias.data.copy_(bias)
        return q

    def dequantize(self) -> torch.Tensor:
        """The full-precision weight [out, in] this layer computes with."""
        groups = self.scale.shape[1]
        codes = self.codes().reshape(self.out_features, groups, -1)
        codes, scale = codes.to(self.scale.dtype), self.scale.unsqueeze(-1)
        if self.zero is None:  # symmetric
            w = (codes - torch.full_like(self.scale, 1 << (self.bits - 1)).unsqueeze(-1)) * scale
        elif self.integer_zero:  # a checkpoint written before the min/max layout: as it computed then
            w = (codes - self.zero.to(self.scale.dtype).unsqueeze(-1)) * scale
        else:
            w = codes * scale + self.zero.unsqueeze(-1)
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    @property
    def integer_zero(self) -> bool:
        """True for an asymmetric layer loaded from a checkpoint written before the min/max layout:
        ``zero`` is then uint8, the code that dequantizes to 0."""
        return self.zero is not None and self.zero.dtype == torch.uint8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym, integer zero point" if self.integer_zero else "asym"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, {kind}"


class RtnQuantizer(quantplug.Quantizer):
    """The two methods every quantizer writes, and the two that keep checkpoints written before the
    min/max layout loading (an asymmetric layer's ``zero`` is then uint8, see the module docstring).
    ``module_tensors`` is ``quantplug.Quantizer``'s default: it stores ``state_dict()``."""

    config: RtnConfig

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        return to_fused(RtnLinear.from_linear(module, self.config), self.config, name)

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        """rtn's packed layout, also for a layer held in a fused kernel's layout."""
        return super().module_tensors(name, canonical(qmodule))

    def offload_refusal(self) -> str | None:
        return None  # a layer is its buffers (codes, scales, zero points; or a kernel's layout of them)

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return RtnLinear.like(module, self.config)  # module is on the meta device: so is the result

    def expected_tensors(
        self, name: str, module: nn.Linear
    ) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]]:
        """``empty_module``'s tensors; an asymmetric ``zero``'s dtype is checked by ``load_module``
        instead (the weight dtype, or uint8 in a checkpoint written before the min/max layout)."""
        spec = super().expected_tensors(name, module)
        if "zero" in spec:
            spec["zero"] = (spec["zero"][0], None)
        return spec

    def integer_grid(self, name: str, qmodule: nn.Module):
        """Symmetric layers (and asymmetric ones with an integer zero point, the old layout) are
        integer grids; the min/max layout's zero is a float (each group's minimum), which formats with
        integer zero points cannot hold."""
        qmodule = canonical(qmodule)
        if not isinstance(qmodule, RtnLinear):
            return f"{type(qmodule).__name__} is not an RtnLinear"
        if qmodule.zero is not None and not qmodule.integer_zero:
            return (
                "its zero points are floats (each group's minimum, the min/max layout), not integer codes; "
                "symmetric rtn configs (symmetric=true) export as they are"
            )
        if qmodule.in_features % qmodule.group_size:
            return (
                f"its last group is partial ({qmodule.in_features} inputs, group_size {qmodule.group_size})"
            )
        half = 1 << (qmodule.bits - 1)
        codes = unpack(qmodule.qweight, qmodule.bits, qmodule.in_features).to(torch.int16) - half
        zero = None if qmodule.zero is None else (qmodule.zero.to(torch.int16) - half).to(torch.int8)
        bias = None if qmodule.bias is None else qmodule.bias.detach()
        return quantplug.IntegerGrid(
            codes.to(torch.int8), qmodule.scale, zero, qmodule.bits, qmodule.group_size, bias
        )

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """``empty_module`` with the checkpoint tensors assigned (a uint8 ``zero`` stays uint8, and
        the layer computes as before the min/max layout); any other dtype of ``zero`` is refused."""
        zero, scale = tensors.get("zero"), tensors.get("scale")
        if zero is not None and scale is not None and zero.dtype not in (scale.dtype, torch.uint8):
            raise quantplug.CheckpointError(
                f"tensor {name + '.zero'!r} has dtype {zero.dtype}, expected {scale.dtype} (the dtype "
                f"of {name + '.scale'!r}: each group's minimum) or torch.uint8 (an integer zero point, "
                f"written by quantplug-rtn before the min/max layout)"
            )
        return to_fused(super().load_module(name, module, tensors), self.config, name)


def canonical(qmodule: nn.Module) -> nn.Module:
    """An ``RtnLinear`` with the weights of a ``FusedRtnLinear`` (anything else as it is)."""
    if not isinstance(qmodule, FusedRtnLinear):
        return qmodule
    return RtnLinear.from_codes(qmodule.codes(), qmodule.group_scales(), qmodule.bias, qmodule)
