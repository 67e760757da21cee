"""Transformers' BitNet weight layout (``transformers.integrations.bitnet.pack_weights``): a uint8
tensor [out / 4, in] where packed row ``r`` holds original rows ``r + k * out / 4`` (k = 0..3) in
bits ``2k .. 2k+1``, each stored as ``w + 1`` in {0, 1, 2}. Ternarizing follows its
``WeightQuant``: ``scale = 1 / mean|W|`` (floored at 1e-5), ``T = round(W * scale)`` clipped to +-1,
computed in float32."""

from __future__ import annotations

import torch

ROWS_PER_BYTE = 4


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int8 ternary codes [out, in] (out a multiple of 4) -> uint8 [out / 4, in]."""
    out_f = codes.shape[0]
    if out_f % ROWS_PER_BYTE:
        raise ValueError(f"{out_f} rows: BitNet packs 4 rows per byte, so rows must be a multiple of 4")
    stored = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(ROWS_PER_BYTE, out_f // ROWS_PER_BYTE, -1)
    packed = stored[0].clone()
    for k in range(1, ROWS_PER_BYTE):
        packed |= stored[k] << (2 * k)
    return packed


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, in] -> int8 codes [4 * rows, in] (2-bit fields minus 1: -1, 0, 1, or 2 for a 3)."""
    rows = packed.shape[0]
    out = torch.empty((ROWS_PER_BYTE * rows, *packed.shape[1:]), dtype=torch.uint8, device=packed.device)
    for k in range(ROWS_PER_BYTE):
        torch.bitwise_and(packed >> (2 * k), 3, out=out[k * rows : (k + 1) * rows])
    return out.view(torch.int8).sub_(1)


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes in {-1, 0, 1}, the float32 scale 1 / mean|W|) as Transformers' ``WeightQuant``."""
    w = weight.detach().float()
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp(-1, 1).to(torch.int8), scale
