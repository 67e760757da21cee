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

Kernels: a symmetric layer (and one of the integer-zero layout) is an ``IntegerGrid``
(``RtnQuantizer.integer_grid``) that ``encode_grid`` rebuilds bit for bit, so after ``quantize`` /
``load`` the core runs it on a fused kernel where one takes it (``quantplug.KernelLinear``: torch's
int8 per-channel and int4 group-wise CPU kernels in a bfloat16 / float16 model) and saves this
layout again. A layer whose last group is partial (576 inputs in groups of 128) is described with
the largest group size dividing both (64: the scales repeated), a multiple of 32 or the layer is not
a grid. The min/max layout's float ``zero`` cannot be rebuilt bit for bit from a grid's zero point:
those layers run ``RtnLinear.forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import quantplug

from .config import RtnConfig

KERNEL_SETTING = {"auto": "auto", "fused": "required", "portable": "none"}
"""``RtnConfig.kernel`` -> the core's ``kernel=`` (``Quantizer.kernel_settings``)."""


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

    def grid(self) -> quantplug.IntegerGrid | str:
        """The layer as an ``IntegerGrid`` (signed codes: code - 2**(bits-1); the integer-zero
        layout's zero points likewise), or why it is not one (see the module docstring)."""
        if self.zero is not None and not self.integer_zero:
            return (
                "its zero points are floats (each group's minimum, the min/max layout), which a grid's "
                "zero point cannot give back bit for bit; symmetric rtn configs (symmetric=true) are grids"
            )
        half = 1 << (self.bits - 1)
        codes = (unpack(self.qweight, self.bits, self.in_features).to(torch.int16) - half).to(torch.int8)
        zero = None if self.zero is None else (self.zero.to(torch.int16) - half).to(torch.int8)
        bias = None if self.bias is None else self.bias.detach()
        # (a partial last group, 576 inputs in groups of 128, is a grid's partial last group too)
        return quantplug.IntegerGrid(codes, self.scale, zero, self.bits, self.group_size, bias)

    @classmethod
    def from_grid(
        cls, grid: quantplug.IntegerGrid, module: nn.Linear, config: RtnConfig, name: str
    ) -> RtnLinear:
        """The layer of ``config`` for ``module`` (its shape) holding exactly ``grid``: the inverse of
        ``grid()``, on the grid's device, scales and bias in the grid's dtypes; padded inputs (a
        partial last group) hold the code of weight 0, as ``from_linear`` writes them."""

        def refuse(why: str) -> quantplug.PluginError:
            return quantplug.PluginError(f"rtn cannot hold the grid of {name!r} as {config!r}: {why}")

        out_f, in_f = module.out_features, module.in_features
        if tuple(grid.codes.shape) != (out_f, in_f):
            raise refuse(f"codes {list(grid.codes.shape)} for a layer of [{out_f}, {in_f}]")
        if grid.columns is not None:
            raise refuse("act-order (columns): rtn's codes are in input order")
        if grid.bits != config.bits:
            raise refuse(f"{grid.bits}-bit codes, the config has bits={config.bits}")
        if grid.float_zero:
            raise refuse(
                "float zero points (rtn's min/max layout stores the group minimum, not a zero point)"
            )
        if config.symmetric != (grid.zero_point is None):
            has = "symmetric" if grid.zero_point is None else "with zero points"
            raise refuse(f"the grid is {has}, the config has symmetric={config.symmetric}")
        q = cls.like(nn.Linear(in_f, out_f, bias=grid.bias is not None, device="meta"), config)
        if grid.group_size != q.group_size:
            raise refuse(f"group size {grid.group_size}, the config's layers have {q.group_size}")
        zero = None
        if grid.zero_point is not None:
            zero = (grid.zero_point.to(torch.int16) + (1 << (config.bits - 1))).to(torch.uint8)
        return q._hold(grid, grid.scale, zero)

    def _hold(self, grid: quantplug.IntegerGrid, scale: torch.Tensor, zero: torch.Tensor | None) -> RtnLinear:
        """This (meta) layer's tensors replaced by the grid's: codes packed, ``zero`` as uint8."""
        half = 1 << (self.bits - 1)
        padded = self.scale.shape[1] * self.group_size
        codes = (grid.codes.to(torch.int16) + half).to(torch.uint8)
        if padded > self.in_features:  # the code of weight 0: 2**(bits-1), or the last group's zero point
            fill = torch.full_like(codes[:, :1], half) if zero is None else zero[:, -1:]
            codes = torch.cat([codes, fill.expand(-1, padded - self.in_features)], 1)
        self.qweight = pack(codes, self.bits)
        self.scale = scale.clone(memory_format=torch.contiguous_format)
        self.zero = zero
        bias = None if grid.bias is None else nn.Parameter(grid.bias.detach().clone(), requires_grad=False)
        self.bias = bias
        return self

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym, integer zero point" if self.integer_zero else "asym"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, {kind}"


class RtnQuantizer(quantplug.Quantizer):
    """The two methods every quantizer writes, the two that keep checkpoints written before the
    min/max layout loading (an asymmetric layer's ``zero`` is then uint8, see the module docstring),
    and the integer-grid methods that put layers on the core's kernels. ``module_tensors`` is
    ``quantplug.Quantizer``'s default: it stores ``state_dict()``."""

    config: RtnConfig

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        return RtnLinear.from_linear(module, self.config)

    def offload_refusal(self) -> str | None:
        return None  # a layer is its buffers (codes, scales, zero points)

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
        """Symmetric layers and those of the integer-zero layout (``RtnLinear.grid``); the min/max
        layout's zero is a float (each group's minimum), which no grid gives back bit for bit."""
        if not isinstance(qmodule, RtnLinear):
            return f"{type(qmodule).__name__} is not an RtnLinear"
        return qmodule.grid()

    def encode_grid(self, name: str, module: nn.Linear, grid: quantplug.IntegerGrid) -> nn.Module:
        """The ``RtnLinear`` of this config holding ``grid`` (``RtnLinear.from_grid``): what the core
        saves for a layer a kernel ran, the same tensors as the layer it was described from."""
        return RtnLinear.from_grid(grid, module, self.config, name)

    def kernel_settings(self) -> dict:
        """``RtnConfig.kernel``: "auto" -> "auto", "fused" -> "required", "portable" -> "none";
        ``dense_from`` as configured (None: the kernel's own crossover)."""
        return {"kernel": KERNEL_SETTING[self.config.kernel], "dense_from": self.config.dense_from}

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
        return super().load_module(name, module, tensors)
