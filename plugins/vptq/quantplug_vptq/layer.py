"""``VptqLinear``: one VPTQ layer holding the checkpoint's tensors exactly as VPTQ's ``VQuantLinear``
stores them, and the pure-PyTorch dequantizer that follows VPTQ's own reference
(``vptq.ops.quant_gemm.dequant`` / ``VQuantLinear.dequant`` in vptq 0.0.5.post1).

Stored per layer (``VQuantLinear.state_dict()``; v = vector length, G = group_num):

- ``centroids.weight``          [G, num_centroids * v]        code book per group (model float dtype)
- ``res_centroids.weight``      [G, num_res_centroids * v]    residual code book (when num_res_centroids > 0)
- ``indices``                   int32 [G, ceil(out / v), ceil(group_size * (ib + rb) / 32)]: per row of
  vectors, group_size entries of ``main | res << ib`` bit-packed least significant bit first
- ``outlier_centroids.weight``  [1, outlier_num_centroids * ov], ``outlier_indices`` int16 (uint16 values)
  [1, ceil(out / ov), outlier_size] (when vector_lens[0] > 1 and num_centroids[0] > 0)
- ``perm``                      int16 (uint16 values) [in]: the input permutation (enable_perm)
- ``weight_scale``, ``weight_bias``  [in] (enable_norm); ``bias`` [out]

The weight: each index picks a column vector of v output rows from its group's code book (plus
the residual's), groups side by side, padding rows dropped; the outlier columns go first; columns
are put back in order by ``argsort(perm)``; then ``W * weight_scale + weight_bias``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerSpec


class Codebook(nn.Module):
    """Holds one code book as ``weight`` (VQuantLinear's ``nn.Embedding``, of which only the
    weight is used: the stored key is ``<name>.weight``)."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)


def packed_words(spec: LayerSpec) -> int:
    """int32 words per row of group indices (VQuantLinear's ``packed_groupsize``)."""
    return math.ceil(spec.group_size * (spec.index_bits + spec.res_bits) / 32)


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class VptqLinear(nn.Module):
    """A VPTQ-quantized Linear: the checkpoint's tensors as stored; the weight is rebuilt on every
    forward (nothing derived is kept, so what is saved is what was loaded)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: LayerSpec,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str = "meta",
    ):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        v, g = spec.vector_len, spec.group_num
        rows = math.ceil(out_features / v)
        self.centroids = Codebook(g, spec.num_centroids * v, dtype, device)
        self.res_centroids = Codebook(g, spec.num_res_centroids * v, dtype, device) if spec.res_bits else None
        self.indices = _param((g, rows, packed_words(spec)), torch.int32, device)
        if spec.outliers:
            ov = spec.outlier_vector_len
            self.outlier_centroids = Codebook(1, spec.outlier_num_centroids * ov, dtype, device)
            self.outlier_indices = _param(
                (1, math.ceil(out_features / ov), spec.outlier_size), torch.int16, device
            )
        if spec.enable_norm:
            self.weight_scale = _param((in_features,), dtype, device)
            self.weight_bias = _param((in_features,), dtype, device)
        if spec.enable_perm:
            self.perm = _param((in_features,), torch.int16, device)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def extra_repr(self) -> str:
        s = self.spec
        res = f"+{s.num_res_centroids}" if s.res_bits else ""
        out = f", outliers={s.outlier_size}" if s.outliers else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, v={s.vector_len}, "
            f"k={s.num_centroids}{res}, groups={s.group_num}x{s.group_size}{out}"
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] in ``dtype`` (default: the code books'), with VPTQ's reference
        arithmetic in that dtype, as Transformers' VPTQ layer computes after casting the stored
        floats to the model's dtype: the same gathers, one addition for the residual, then
        ``W * weight_scale + weight_bias``; the values equal VPTQ's torch path bit for bit. Without
        outliers the permutation is applied to the indices (1/v of the weight's size)."""
        s = self.spec
        dtype = dtype or self.centroids.weight.dtype
        main, res = unpack_indices(self.indices, s.group_size, s.index_bits, s.res_bits)
        order = None
        if s.enable_perm:
            order = torch.argsort(self.perm.to(torch.int64) & 0xFFFF)  # int16 holding uint16 values
        early = order if not s.outliers else None
        w = _lookup(self.centroids.weight.to(dtype), main, s.vector_len, early)
        if self.res_centroids is not None:
            w += _lookup(self.res_centroids.weight.to(dtype), res, s.vector_len, early)
        w = w[: self.out_features]
        if s.outliers:
            outl = self.outlier_indices.to(torch.int64) & 0xFFFF
            book, ov = self.outlier_centroids.weight.to(dtype), s.outlier_vector_len
            w = torch.cat([_lookup(book, outl, ov)[: self.out_features], w], 1)
            if order is not None:
                w = w.index_select(1, order)
        if s.enable_norm:  # (w is this call's own tensor: in place)
            w = w.mul_(self.weight_scale.to(dtype)).add_(self.weight_bias.to(dtype))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


def unpack_indices(
    packed: torch.Tensor, count: int, index_bits: int, res_bits: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """VPTQ's bit-packed indices (int32 [..., words], ``count`` entries of ``index_bits + res_bits``
    bits per row, least significant bit first, each ``main | res << index_bits``) as int64 tensors
    [..., count]: the main indices and the residual ones (None without residual bits).

    VPTQ's ``unpack_index_tensor`` expands every bit into an int64 (32 per word); here the entries
    are read from strided slices instead: ``32 / gcd(bits, 32)`` entries fill a block of
    ``bits / gcd(bits, 32)`` words exactly, so entry ``j`` of every block sits at the same word and
    shift. The values are the same (tests/test_vptq.py)."""
    bits = index_bits + res_bits
    per, span = 32 // math.gcd(bits, 32), bits // math.gcd(bits, 32)
    blocks = -(-count // per)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = F.pad(words, (0, blocks * span + 1 - words.shape[-1]))  # + 1: the word after the last block
    here = words[..., : blocks * span].unflatten(-1, (blocks, span))
    after = words[..., 1 : blocks * span + 1].unflatten(-1, (blocks, span))
    entries = []
    for j in range(per):
        w, shift = divmod(j * bits, 32)
        value = here[..., w] >> shift
        if shift + bits > 32:  # continues in the next word
            value = value | (after[..., w] << (32 - shift))
        entries.append(value)
    value = torch.stack(entries, -1).flatten(-2)[..., :count] & ((1 << bits) - 1)
    main = value & ((1 << index_bits) - 1)
    return main, (value >> index_bits if res_bits else None)


def _lookup(book: torch.Tensor, idx: torch.Tensor, v: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Code vectors for ``idx`` [G, rows, cols] from ``book`` [G, K * v], laid out as VPTQ's
    dequant does: [rows * v, G * cols], vector entries down the rows, groups side by side;
    ``order``: the columns taken in that order (``W[:, order]``, done on the indices)."""
    g, rows, cols = idx.shape
    k = book.shape[1] // v
    if g > 1:  # each group's rows of the stacked code books
        idx = idx + torch.arange(g, device=idx.device).view(g, 1, 1) * k
    flat = idx.permute(1, 0, 2).reshape(rows, g * cols)
    if order is not None:
        flat = flat.index_select(1, order)
    sel = book.reshape(g * k, v).index_select(0, flat.reshape(-1)).view(rows, g * cols, v)
    return sel.transpose(1, 2).reshape(rows * v, g * cols)
