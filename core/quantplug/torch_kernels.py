"""torch's own fused weight-only CPU kernels, as ``quantplug.Kernel``s for any integer-grid layer.

- ``torch-int4-cpu``: ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero)``
  computes ``(code - 8) * scale + zero`` per group (codes 0..15). A grid's weight
  ``(c - zp) * s`` (signed codes c = code - 8) is that with ``zero = -zp * s``: symmetric,
  asymmetric with integer zero points (GPTQ, AWQ, AutoRound, compressed-tensors) and HQQ's float
  zero points alike. Group sizes that are multiples of 32 run as groups of 256 / 128 / 64 / 32
  sharing their scale (per-channel int4 too); a partial last group (576 inputs in groups of 128)
  is padded with zero weights and the input with zeros.
- ``torch-int8-cpu``: ``aten._weight_int8pack_mm(x, codes [out, in], scale [out])``, per-channel
  int8; a zero point per row adds ``-(zp * s) * sum(x)`` (one reduction of the input).

Measured on a 2-core Intel Xeon (AVX-512 BF16), one 1536 x 576 layer, one row: fp32 ``F.linear``
59 us, bf16 91 us, int8 kernel 31 us, int4 kernel 30 us; at 64 rows the int8 kernel takes 805 us
against bf16's 156 us, hence ``dense_from`` (bench/results/fused_cpu.json). They run bfloat16 and
float16 activations; with float32 ones they are slower than dequantizing.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_base import Kernel

FAST_CAPABILITIES = ("AVX2", "AVX512")
"""torch's CPU capabilities with vectorized int8/int4 kernels; elsewhere they run scalar code."""
INT4_GROUPS = (256, 128, 64, 32)


def _op_problem(*ops: str) -> str | None:
    for op in ops:
        if not hasattr(torch.ops.aten, op):
            return f"this torch ({torch.__version__}) has no aten.{op}"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(FAST_CAPABILITIES):
        return (
            f"torch reports CPU capability {capability!r}: its int8/int4 kernels are vectorized only for "
            f"{' and '.join(FAST_CAPABILITIES)}, and would be slower than dequantizing"
        )
    return None


_local = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of at least ``numel`` elements that this thread's layers dequantize into one
    after another (the dense path): a fresh allocation of a layer's weight on every forward costs
    page faults (measured: 1536 x 576 int8 dequantized in 204 us into new memory, 156 us into
    reused). One per thread, dtype and device, as large as the largest layer run; under
    ``torch.compile`` a fresh tensor (the compiled graph plans its own memory)."""
    if torch.compiler.is_compiling():
        return torch.empty(numel, dtype=dtype, device=device)
    pool = _local.__dict__.setdefault("pool", {})
    key = (dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _scaled(codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = codes * scale`` in ``out``'s dtype: one pass over the weight (int8 codes converted
    and multiplied at once), the same bits as converting, then multiplying."""
    if torch.compiler.is_compiling():  # (the compiler refuses out= into views; it fuses the two anyway)
        out.copy_(codes).mul_(scale)
    else:
        torch.mul(codes, scale, out=out)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [out, in] (out a multiple of 64) in the layout of
    ``aten._convert_weight_to_int4pack_for_cpu``: per block of 64 output rows, for every input,
    32 bytes holding row j in the low and row j + 32 in the high nibble."""
    out_f, in_f = codes.shape
    blocks = codes.to(torch.uint8).reshape(out_f // 64, 2, 32, in_f).transpose(2, 3)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).reshape(out_f, in_f // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``, centred: codes - 8 as int8 [out, in] (-8..7)."""
    out_f, half = packed.shape
    blocks = packed.view(out_f // 64, half * 2, 32).transpose(1, 2)  # [blocks, 32, in]: row j, j + 32
    if torch.compiler.is_compiling():  # the same, without out= into views (which the compiler refuses)
        both = torch.stack([blocks & 15, blocks >> 4], 1)  # [blocks, 2, 32, in]
        return both.reshape(out_f, half * 2).to(torch.int8) - 8
    codes = torch.empty(out_f // 64, 2, 32, half * 2, dtype=torch.int8, device=packed.device)
    torch.bitwise_and(blocks, 15, out=codes[:, 0].view(torch.uint8))
    torch.bitwise_right_shift(blocks, 4, out=codes[:, 1].view(torch.uint8))
    return codes.view(out_f, half * 2).sub_(8)


@functools.cache
def int4_packing_known() -> bool:
    """Whether torch packs int4 CPU weights as ``pack_int4`` does (checked once on random codes):
    the layout is torch's internal, so a torch that changes it turns the int4 kernel off."""
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return False
    return torch.equal(packed, pack_int4(codes))


def _offsets(grid, dtype: torch.dtype) -> torch.Tensor | None:
    """``-zero_point * scale`` [out, groups] in float32 (None: symmetric)."""
    if grid.zero_point is None:
        return None
    return -(grid.zero_point.float() * grid.scale.float())


class TorchInt4Weights(nn.Module):
    """A grid's codes packed for ``aten._weight_int4pack_mm_for_cpu`` (rows padded to 64, inputs to
    whole groups: a partial last group's missing inputs are zero weights, and the input is padded
    with zeros to meet them)."""

    def __init__(self, grid, dtype: torch.dtype):
        super().__init__()
        out_f, in_f = grid.codes.shape
        self.out_features, self.in_features = out_f, in_f
        self.group = next(g for g in INT4_GROUPS if grid.group_size % g == 0)
        self.repeat = grid.group_size // self.group
        self.padded_out = math.ceil(out_f / 64) * 64
        self.padded_in = grid.scale.shape[1] * grid.group_size
        pad = self.padded_out - out_f
        codes = F.pad(grid.codes.to(torch.int16) + 8, (0, self.padded_in - in_f, 0, pad), value=8)
        self.register_buffer("packed", pack_int4(codes))  # padded rows and inputs: weight 0
        scale = grid.scale.float().repeat_interleave(self.repeat, 1)
        zero = _offsets(grid, dtype)
        self.symmetric = zero is None  # (the dense path then skips adding the zero offsets)
        zero = torch.zeros_like(scale) if zero is None else zero.repeat_interleave(self.repeat, 1)
        sz = torch.stack([F.pad(scale, (0, 0, 0, pad)).T, F.pad(zero, (0, 0, 0, pad)).T], -1)
        self.register_buffer("scale_zero", sz.to(dtype).contiguous())  # [groups, padded out, 2]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        sz = self.scale_zero if self.scale_zero.dtype == x.dtype else self.scale_zero.to(x.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, sz)
        return out[:, : self.out_features]

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed)[: self.out_features, : self.in_features]

    def scales(self) -> torch.Tensor:
        """The grid's scales [out, groups] as the kernel holds them (in the model's dtype)."""
        return self.scale_zero[:: self.repeat, : self.out_features, 0].T

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        out = scratch(self.padded_out * self.padded_in, dtype, self.packed.device)
        w = out[: self.out_features * self.padded_in].view(self.out_features, -1, self.group)
        sz = self.scale_zero[:, : self.out_features].to(dtype)  # [groups, out, 2]
        codes = unpack_int4(self.packed)[: self.out_features]
        _scaled(codes.view_as(w), sz[..., 0].T.unsqueeze(-1), w)
        if not self.symmetric:
            w.add_(sz[..., 1].T.unsqueeze(-1))
        return w.view(self.out_features, self.padded_in)[:, : self.in_features]


class TorchInt8Weights(nn.Module):
    """A per-channel grid's codes for ``aten._weight_int8pack_mm`` (inputs padded to 16)."""

    def __init__(self, grid, dtype: torch.dtype):
        super().__init__()
        out_f, in_f = grid.codes.shape
        self.out_features, self.in_features = out_f, in_f
        # the kernel reads past the row end unless the input width is a multiple of 16 (measured:
        # 130 or 136 inputs give inf or crash, 144 is right): pad with zero weights
        self.kernel_in = math.ceil(in_f / 16) * 16
        self.register_buffer("weight", F.pad(grid.codes, (0, self.kernel_in - in_f)).contiguous())
        self.register_buffer("scale", grid.scale.reshape(-1).to(dtype).contiguous())
        zero = _offsets(grid, dtype)
        self.register_buffer("offset", None if zero is None else zero.reshape(1, -1).to(dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if self.kernel_in == self.in_features else F.pad(x, (0, self.kernel_in - self.in_features))
        scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, scale)
        if self.offset is not None:  # sum_i x_i * (-zp * s): one reduction of the input per row
            out = out.addmm_(
                x.sum(-1, keepdim=True, dtype=torch.float32).to(x.dtype), self.offset.to(x.dtype)
            )
        return out

    def codes(self) -> torch.Tensor:
        return self.weight[:, : self.in_features]

    def scales(self) -> torch.Tensor:
        return self.scale.reshape(-1, 1)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        out = scratch(self.out_features * self.kernel_in, dtype, self.weight.device)
        w = out[: self.out_features * self.kernel_in].view(self.out_features, self.kernel_in)
        _scaled(self.weight, self.scale.to(dtype).unsqueeze(-1), w)
        if self.offset is not None:
            w.add_(self.offset.to(dtype).T)
        return w[:, : self.in_features]


class TorchInt4Cpu(Kernel):
    name = "torch-int4-cpu"
    description = "torch's fused int4 weight-only CPU matmul (aten._weight_int4pack_mm_for_cpu)"
    dense_from = 96
    priority = 10

    def machine_problem(self) -> str | None:
        problem = _op_problem("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
        if problem is None and not int4_packing_known():
            problem = (
                f"this torch ({torch.__version__}) packs int4 CPU weights in a layout quantplug does not know"
            )
        return problem

    def layout_problem(self, layout) -> str | None:
        if layout.bits != 4:
            return f"{layout.bits}-bit codes (it takes 4-bit)"
        if layout.group_size % 32:
            return f"group size {layout.group_size} (it takes multiples of 32)"
        return None

    def build(self, grid, dtype):
        return TorchInt4Weights(grid, dtype)


class TorchInt8Cpu(Kernel):
    name = "torch-int8-cpu"
    description = "torch's fused int8 weight-only CPU matmul, per channel (aten._weight_int8pack_mm)"
    dense_from = 32
    priority = 10

    def machine_problem(self) -> str | None:
        return _op_problem("_weight_int8pack_mm")

    def layout_problem(self, layout) -> str | None:
        if layout.bits != 8:
            return f"{layout.bits}-bit codes (it takes 8-bit)"
        if not layout.per_channel:
            return f"groups of {layout.group_size} inputs (it takes one scale per output channel)"
        return None

    def build(self, grid, dtype):
        return TorchInt8Weights(grid, dtype)


BUILTIN = (TorchInt4Cpu(), TorchInt8Cpu())
