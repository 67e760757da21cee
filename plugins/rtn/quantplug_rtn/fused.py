"""Fused CPU kernels for rtn layers: torch's own weight-only int8 and int4 matmuls.

``FusedRtnLinear`` holds a symmetric rtn layer in the layout of one of torch's CPU kernels and
runs it without materialising the weight:

- int8 per channel: ``aten._weight_int8pack_mm(x, w_int8 [out, in], scale [out])``;
- int4 group-wise (group 32/64/128/256): ``aten._weight_int4pack_mm_for_cpu(x, packed, group,
  scale_zero [groups, out, 2])``, which computes ``(code - 8) * scale + zero`` per group; rtn's
  symmetric codes are centred on 8, so ``zero`` is 0 and the layer computes the same weights.

The kernels are fast at decode (a few rows): measured on a 2-core Intel Xeon (AVX-512 BF16), one
1536 x 576 layer, one row: fp32 ``F.linear`` 59 us, bf16 91 us, int8 kernel 31 us, int4 kernel 30 us.
They are slow for many rows (64 rows: int8 805 us against bf16's 156 us), so from ``dense_from``
rows on the layer dequantizes its weight (in the activation dtype) and runs the dense matmul:
size-aware dispatch, the same weights on both sides (tested). They run with bfloat16 or float16
activations; float32 activations make them slower than dequantizing (int8: 266 us against 59 us
for fp32 ``F.linear``), so a float32 layer dequantizes on every forward, and says so once.

Checkpoints do not change: ``canonical()`` gives back rtn's packed layout (``RtnLinear``), which
is what ``RtnQuantizer.module_tensors`` stores and every device loads.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import quantplug

from .config import DENSE_FROM, layout_problem

__all__ = ["FusedRtnLinear", "kernel_problem", "to_fused"]

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
"""Activation dtypes the fused kernels run with (float32 dequantizes instead, see the docstring)."""
FAST_CAPABILITIES = ("AVX2", "AVX512")
"""torch's CPU capabilities with vectorized int8/int4 kernels; elsewhere they run scalar code."""

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


@functools.cache
def kernel_problem() -> str | None:
    """Why this machine cannot run the fused kernels fast (None: it can)."""
    for op in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"):
        if not hasattr(torch.ops.aten, op):
            return f"this torch ({torch.__version__}) has no aten.{op}"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(FAST_CAPABILITIES):
        return (
            f"torch reports CPU capability {capability!r}: its int8/int4 kernels are vectorized only "
            f"for {' and '.join(FAST_CAPABILITIES)}, and would be slower than dequantizing"
        )
    if not _int4_packing_known():
        return (
            f"this torch ({torch.__version__}) packs int4 CPU weights in a layout quantplug-rtn does not know"
        )
    return None


_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of at least ``numel`` elements that this thread's fused layers dequantize into
    one after another (the dense path): a fresh allocation of a layer's weight on every forward
    costs page faults (measured: 1536 x 576 int8 dequantized in 204 us into new memory, 156 us into
    reused). One per thread, dtype and device, as large as the largest layer run."""
    pool = _local.__dict__.setdefault("pool", {})
    key = (dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [out, in] (out a multiple of 64) in the layout of
    ``aten._convert_weight_to_int4pack_for_cpu``: per block of 64 output rows, for every input,
    32 bytes holding row j in the low and row j + 32 in the high nibble."""
    out_f, in_f = codes.shape
    blocks = codes.to(torch.uint8).reshape(out_f // 64, 2, 32, in_f).transpose(2, 3)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).reshape(out_f, in_f // 2).contiguous()


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_pack_int4``, centred: codes - 8 as int8 [out, in] (-8..7)."""
    out_f, half = packed.shape
    blocks = packed.view(out_f // 64, half * 2, 32).transpose(1, 2)  # [blocks, 32, in]: row j, j + 32
    codes = torch.empty(out_f // 64, 2, 32, half * 2, dtype=torch.int8, device=packed.device)
    torch.bitwise_and(blocks, 15, out=codes[:, 0].view(torch.uint8))
    torch.bitwise_right_shift(blocks, 4, out=codes[:, 1].view(torch.uint8))
    return codes.view(out_f, half * 2).sub_(8)


@functools.cache
def _int4_packing_known() -> bool:
    """Whether torch packs int4 CPU weights as ``_pack_int4`` does (checked once on random codes):
    the layout is torch's internal, so a torch that changes it turns the fused int4 path off."""
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return False
    return torch.equal(packed, _pack_int4(codes))


class FusedRtnLinear(nn.Module):
    """A symmetric rtn layer stored for torch's fused CPU kernels (see the module docstring)."""

    def __init__(self, src, *, dense_from: int | None):
        """From a symmetric ``RtnLinear`` ``src`` whose settings ``layout_problem`` accepts (same weights)."""
        super().__init__()
        self.in_features, self.out_features = src.in_features, src.out_features
        self.bits, self.group_size, self.symmetric = src.bits, src.group_size, True
        self.layout = "int8" if src.bits == 8 else "int4"
        self.dense_from = DENSE_FROM[self.layout] if dense_from is None else dense_from
        self.padded_in = src.scale.shape[1] * src.group_size  # rtn's input width (whole groups)
        # the int8 kernel reads past the row end unless the input width is a multiple of 16 (measured:
        # 130 or 136 inputs give inf or crash, 144 is right): pad with zero weights
        self.kernel_in = math.ceil(self.padded_in / 16) * 16 if self.layout == "int8" else self.padded_in
        self.padded_out = math.ceil(src.out_features / 64) * 64 if self.layout == "int4" else src.out_features
        half = 1 << (src.bits - 1)
        codes = src.codes()  # uint8 [out, padded_in], centred on ``half``
        if self.layout == "int8":
            weight = (codes.to(torch.int16) - half).to(torch.int8)
            self.register_buffer("weight_int8", F.pad(weight, (0, self.kernel_in - self.padded_in)))
            self.register_buffer("scale", src.scale.reshape(-1).clone())
        else:
            pad_out = self.padded_out - src.out_features
            codes = F.pad(codes, (0, 0, 0, pad_out), value=half)  # padded rows: weight 0
            self.register_buffer("weight_int4", _pack_int4(codes))
            scale = F.pad(src.scale, (0, 0, 0, pad_out))
            self.register_buffer(
                "scale_zero", torch.stack([scale.T, torch.zeros_like(scale.T)], -1).contiguous()
            )
        self.bias = None if src.bias is None else nn.Parameter(src.bias.detach().clone(), requires_grad=False)

    def codes(self) -> torch.Tensor:
        """rtn's codes (uint8, centred on 2**(bits-1)) [out, padded in]."""
        if self.layout == "int8":
            return (self.weight_int8[:, : self.padded_in].to(torch.int16) + 128).to(torch.uint8)
        return (_unpack_int4(self.weight_int4)[: self.out_features] + 8).view(torch.uint8)

    def group_scales(self) -> torch.Tensor:
        """rtn's ``scale`` [out, groups]."""
        if self.layout == "int8":
            return self.scale.reshape(-1, 1)
        return self.scale_zero[..., 0].T[: self.out_features].contiguous()

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [out, in] the layer computes with, in ``dtype`` (default: the scales'),
        written into ``out`` (a flat tensor of that dtype with room for it) when given."""
        scale = self.group_scales()
        dtype = dtype or scale.dtype
        if out is None:
            out = torch.empty(self.out_features * self.kernel_in, dtype=dtype, device=scale.device)
        if self.layout == "int8":
            w = out[: self.out_features * self.kernel_in].view(self.out_features, self.kernel_in)
            w.copy_(self.weight_int8).mul_(scale.to(dtype))
            return w[:, : self.in_features]
        codes = _unpack_int4(self.weight_int4)[: self.out_features]  # centred: -8..7
        w = out[: self.out_features * self.padded_in].view(self.out_features, -1, self.group_size)
        w.copy_(codes.view_as(w)).mul_(scale.to(dtype).unsqueeze(-1))
        return w.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if rows >= self.dense_from or not self._kernel_runs(x):
            # the weight in the scales' dtype, then in the input's: what the portable layer computes
            dtype = self.group_scales().dtype
            scratch = None  # autograd keeps the weight for the backward pass: then it gets its own memory
            if not (torch.is_grad_enabled() and x.requires_grad):
                scratch = _scratch(self.out_features * max(self.kernel_in, self.padded_in), dtype, x.device)
            return F.linear(x, self.dequantize(dtype, out=scratch).to(x.dtype), bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels refuse strided inputs
        if self.kernel_in != self.in_features:
            flat = F.pad(flat, (0, self.kernel_in - self.in_features))
        if self.layout == "int8":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale.to(x.dtype))
        else:
            sz = self.scale_zero if self.scale_zero.dtype == x.dtype else self.scale_zero.to(x.dtype)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group_size, sz)
            out = out[:, : self.out_features]
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias

    def _kernel_runs(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu":
            return False
        if x.dtype not in KERNEL_DTYPES:
            _warn_once(
                f"dtype:{x.dtype}",
                f"quantplug-rtn: {self.layout} layers got {x.dtype} activations; the fused CPU kernels "
                f"run with {' or '.join(map(str, KERNEL_DTYPES))}, so these layers dequantize on every "
                f"forward (slower than the unquantized model): build the model in torch.bfloat16",
            )
            return False
        return True

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym, fused {self.layout} kernel below {self.dense_from} rows"
        )


def to_fused(layer, config, name: str) -> nn.Module:
    """``layer`` (an ``RtnLinear``) as a ``FusedRtnLinear`` where ``config.kernel`` asks for one
    and the layer, device and machine allow it; otherwise ``layer`` itself (``kernel="auto"``
    says once why a fusable layer is not fused; ``kernel="fused"`` raises instead)."""
    if config.kernel == "portable":
        return layer
    problem = layout_problem(config.bits, config.group_size, config.symmetric)
    if problem is None and layer.scale.device.type != "cpu":
        problem = f"the fused kernels are CPU kernels and layer {name!r} is on {layer.scale.device}"
    if problem is None and layer.scale.dtype not in KERNEL_DTYPES:
        problem = (
            f"the fused kernels run {' or '.join(map(str, KERNEL_DTYPES))} models, and layer {name!r} is "
            f"{layer.scale.dtype}"
        )
        if config.kernel == "auto" and layer.scale.dtype == torch.float32:
            _warn_once(
                "float32",
                "quantplug-rtn: a float32 model: its int8 / int4 layers dequantize on every forward (slower "
                "than the unquantized model); build the model in torch.bfloat16 to run torch's fused CPU kernels",
            )
    if problem is None:
        problem = kernel_problem()
        if problem is not None and config.kernel == "auto":
            _warn_once("machine", f"quantplug-rtn: {problem}; rtn layers run the portable path")
            return layer
    if problem is None:
        return FusedRtnLinear(layer, dense_from=config.dense_from)
    if config.kernel == "fused":
        raise quantplug.ConfigError(f"RtnConfig(kernel='fused'): {problem}", field="kernel", value="fused")
    return layer
