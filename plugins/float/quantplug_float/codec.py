"""Float8 (e4m3) and e8m0 arithmetic in plain PyTorch: block-wise quantization, and dequantization
fast enough to run on every forward on a CPU.

``quantize_blocks`` implements the formula Transformers' ``Fp8Quantize`` uses (per tile of
``block`` = (rows, cols): ``amax``, ``q = clamp(w / s, ±448)`` cast to e4m3, ``s`` stored), on any
shape (a ragged last tile is padded, the grid is ``ceil``-sized) and with ``s`` rounded up to a value
bfloat16 holds exactly (``ue8m0``: up to a power of two), so that ``dequantize`` can build the
bfloat16 weight with integer ops and one bfloat16 multiply, bit-identical to Transformers' float32
``q * s`` rounded to bfloat16 (``dequantize`` checks this and takes the exact float32 path when a
checkpoint's scales are not so; DeepSeek-V3's fp32 scales are not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_BF16_SHIFT = 2.0**120  # e4m3 bits placed in bfloat16's low exponent bits read as value * 2**-120


def grid_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a ``rows`` x ``cols`` weight in tiles of ``block`` (ceil: a ragged last tile has its own scale)."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def round_up_bf16(s: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16-representable float32 >= ``s`` (positive, finite)."""
    bits = s.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(s.float().clamp_min(torch.finfo(torch.float32).tiny))))


def e8m0_bytes(s: torch.Tensor) -> torch.Tensor:
    """Powers of two as e8m0 bytes (``2**(byte - 127)``)."""
    return (torch.log2(s.float()).round() + 127).clamp(0, 254).to(torch.uint8)


def scales_as_float(scale: torch.Tensor) -> torch.Tensor:
    """A stored scale tensor (float32, bfloat16, float8_e8m0fnu, or e8m0 bytes as uint8) as float32."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


def quantize_blocks(
    w: torch.Tensor, block: tuple[int, int], pow2: bool = False, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [..., rows, cols] as e4m3 codes and float32 scales [..., ceil(rows/bm), ceil(cols/bn)]
    (``w ~ q * s`` per tile). ``pow2``: scales are powers of two (ue8m0). ``floor``: the least scale
    (FBGEMM bounds its forward scale). An all-zero tile gets scale 1 (Transformers' choice)."""
    *lead, rows, cols = w.shape
    bm, bn = block
    gr, gc = grid_shape(rows, cols, block)
    x = F.pad(w.float(), (0, gc * bn - cols, 0, gr * bm - rows))
    x = x.reshape(*lead, gr, bm, gc, bn)
    amax = x.abs().amax(dim=(-3, -1))
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).clamp_min(floor)
    s = round_up_pow2(s) if pow2 else round_up_bf16(s)
    q = (x / s.unsqueeze(-1).unsqueeze(-3)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    q = q.reshape(*lead, gr * bm, gc * bn)[..., :rows, :cols].contiguous()
    return q, s


def _e4m3_as_bf16_shifted(q: torch.Tensor) -> torch.Tensor:
    """e4m3 codes as bfloat16 ``q * 2**-120``, exactly (subnormals too), by integer ops (a cast
    from float8 is ~7x slower on CPU). NaN codes (never written by ``quantize_blocks``) read as 480."""
    x = q.view(torch.int8).to(torch.int16)  # sign-extended: bits 7..15 all hold the sign
    x <<= 4  # exponent and mantissa to bfloat16's low exponent and mantissa bits (4..10)
    x &= -30721  # 0x87FF: keep the sign at bit 15, clear the sign copies at 11..14
    return x.view(torch.bfloat16)


def _apply(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = q.shape[-2:]
    bm, bn = block
    gr, gc = s.shape[-2:]
    if rows == gr * bm and cols == gc * bn:
        return (q.reshape(*q.shape[:-2], gr, bm, gc, bn) * s.unsqueeze(-1).unsqueeze(-3)).reshape(q.shape)
    full = s.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
    return q * full


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``q * scale`` per tile of ``block``, in ``dtype``: what Transformers' dequantizer gives
    (float32 product, rounded once to ``dtype``). ``scale``: [..., gr, gc] as stored (any of the
    dtypes ``scales_as_float`` reads), or one scalar for the whole tensor."""
    s = scales_as_float(scale)
    if s.dim() < 2:  # one scale for the tensor (a 0-d or [1] weight_scale_inv)
        s, block = s.reshape(1, 1), (q.shape[-2], q.shape[-1])
    if dtype == torch.bfloat16:
        shifted = s * _BF16_SHIFT
        s16 = shifted.to(torch.bfloat16)
        # exact when every scale is a bfloat16 value (quantize_blocks writes only those) and in range
        if bool(((s16.float() == shifted) & (s < 2.0**7)).all()):
            return _apply(_e4m3_as_bf16_shifted(q), s16, block)
    return _apply(q.float(), s, block).to(dtype)
