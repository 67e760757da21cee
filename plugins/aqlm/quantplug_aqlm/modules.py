"""``AqlmLinear``: an AQLM layer holding ``codes``, ``codebooks``, ``scales`` (and ``bias``) exactly as
aqlm's ``QuantizedLinear`` and Transformers' checkpoints store them, with a plain-PyTorch forward.

Layout (aqlm 1.1.7 ``aqlm.inference.QuantizedLinear``):

- ``codes``      int8 (nbits <= 8) / int16 [out / out_group_size, in / in_group_size, num_codebooks],
                 stored signed: the code is ``codes % 2 ** nbits``
- ``codebooks``  float [num_codebooks, 2 ** nbits, out_group_size, in_group_size]
- ``scales``     float [out / out_group_size, 1, 1, 1]
- ``bias``       float [out] (optional)

``W[g * ogs + a, h * igs + b] = scales[g] * sum_k codebooks[k, codes[g, h, k], a, b]``
(aqlm.utils._dequantize_weight). The stored tensors are only ever read: aqlm's own module
permutes ``codes`` in place on its first CPU forward with 8-bit codebooks, so a model saved after
running it writes a transposed layout; this one never does.

Two ways to compute, chosen per call (``prefers_lut``):

- dequantize: rebuild the weight a block of output rows at a time (``F.embedding_bag`` over the
  codebooks, as aqlm's ``dequantize_gemm``) and multiply, block by block, so the dense weight never
  exists whole;
- look-up table (small codebooks, few tokens): every input group's dot product with every codebook
  vector, then each output sums ``num_codebooks * in / in_group_size`` table entries
  (aqlm's numba kernel does the same on CPU).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

LUT_MAX_CODEBOOK = 256
"""Largest codebook the look-up table is used for: its table has ``tokens * in / igs * K * 2**nbits``
entries, which for 1x16 (65536 vectors) is 32x the weight itself per token."""
LUT_MAX_TOKENS = 2
"""Most rows of input (tokens) the look-up table takes; past it, dequantizing once and one matmul
win (a 2048 x 2048 2x8 layer on one thread, look-up table against dequantize: 1 token 1.2 ms
against 2.7, 2 tokens 2.4 against 2.9, 4 tokens 6.3 against 3.3)."""
BLOCK_WEIGHTS = 1 << 20
"""Weights dequantized per block (4 MiB in float32): the dense weight never exists whole."""


_SCRATCH = threading.local()


def _index_buffer(numel: int, device: torch.device, reuse: bool) -> torch.Tensor:
    """An int32 buffer for a look-up index, one per thread and device, reused from layer to layer
    (a fresh multi-megabyte tensor per call costs more in page faults than the look-ups themselves);
    a fresh one where autograd may keep it (``reuse`` False)."""
    if not reuse:
        return torch.empty(numel, dtype=torch.int32, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(device)
    if buf is None or buf.numel() < numel:
        buf = buffers[device] = torch.empty(numel, dtype=torch.int32, device=device)
    return buf[:numel]


def codes_dtype(nbits: int) -> torch.dtype:
    """aqlm.utils.get_int_dtype for the bit widths quantplug-aqlm takes (1 to 16)."""
    return torch.int8 if nbits <= 8 else torch.int16


class AqlmLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_group_size: int,
        out_group_size: int,
        num_codebooks: int,
        nbits_per_codebook: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features % in_group_size or out_features % out_group_size:
            raise ValueError(
                f"a [{out_features}, {in_features}] layer does not split into AQLM groups of "
                f"{out_group_size} x {in_group_size}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.in_group_size, self.out_group_size = in_group_size, out_group_size
        self.num_codebooks, self.nbits_per_codebook = num_codebooks, nbits_per_codebook
        self.codebook_size = 2**nbits_per_codebook
        out_groups, in_groups = out_features // out_group_size, in_features // in_group_size
        floats = {"device": device, "dtype": dtype}
        self.codebooks = nn.Parameter(
            torch.empty(num_codebooks, self.codebook_size, out_group_size, in_group_size, **floats),
            requires_grad=False,
        )
        self.codes = nn.Parameter(
            torch.empty(
                out_groups, in_groups, num_codebooks, device=device, dtype=codes_dtype(nbits_per_codebook)
            ),
            requires_grad=False,
        )
        self.scales = nn.Parameter(torch.empty(out_groups, 1, 1, 1, **floats), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **floats), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._cache: dict = {}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.num_codebooks}x{self.nbits_per_codebook}, "
            f"groups={self.out_group_size}x{self.in_group_size}, bias={self.bias is not None}"
        )

    # -- derived tensors (never written back) ------------------------------------------------------

    def _derived(self, key: str, source: torch.Tensor, make):
        """``make()``, cached until ``source`` changes (a load, ``.to()``, an in-place edit)."""
        stamp = (source.data_ptr(), source._version, source.device, source.dtype)
        hit = self._cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = (stamp, make())
            self._cache[key] = hit
        return hit[1]

    def _codebooks_in(self, dtype: torch.dtype) -> torch.Tensor:
        if self.codebooks.dtype == dtype:
            return self.codebooks
        return self._derived(f"codebooks:{dtype}", self.codebooks, lambda: self.codebooks.to(dtype))

    def _offsets(self, per_group: bool) -> torch.Tensor:
        """int32 offsets of each codebook in a flat table: [K] (the codebooks), or, ``per_group``,
        [in_groups, K] (a look-up table of every input group and codebook)."""

        def make():
            n = self.codes.shape[1] * self.num_codebooks if per_group else self.num_codebooks
            offsets = torch.arange(n, device=self.codes.device, dtype=torch.int32) * self.codebook_size
            return offsets.view(-1, self.num_codebooks)

        return self._derived(f"offsets:{per_group}", self.codes, make)

    def _index(self, rows: slice, per_group: bool, reuse: bool) -> torch.Tensor:
        """int32 [groups, in_groups, K]: each unsigned code (``codes % 2 ** nbits``, aqlm's
        unpack_int_data) plus its codebook's offset, in a reused buffer where ``reuse``."""
        codes = self.codes[rows]
        index = _index_buffer(codes.numel(), codes.device, reuse).view(codes.shape)
        if self.nbits_per_codebook == 8:  # the stored two's complement byte is the code
            torch.add(codes.view(torch.uint8), self._offsets(per_group), out=index)
            return index
        if self.nbits_per_codebook == 16:
            index.copy_(codes.view(torch.uint16))
        else:
            torch.remainder(codes, self.codebook_size, out=index)
        return index.add_(self._offsets(per_group))

    # -- the weight --------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """The weight of output groups ``rows`` ([rows * out_group_size, in]), as aqlm's
        ``_dequantize_weight(unpack_int_data(codes), codebooks, scales)`` computes it."""
        dtype = dtype or self.codebooks.dtype
        k, size, ogs, igs = self.codebooks.shape
        table = self._codebooks_in(dtype).flatten(0, 1).flatten(-2, -1)  # [K * size, ogs * igs]
        index = self._index(
            rows, per_group=False, reuse=not (torch.is_grad_enabled() and table.requires_grad)
        )
        groups, in_groups = index.shape[:2]
        flat = F.embedding_bag(index.flatten(0, -2), table, mode="sum")
        weight = flat.view(groups, in_groups, ogs, igs).mul(self.scales[rows].to(dtype))
        return weight.swapaxes(1, 2).reshape(groups * ogs, in_groups * igs)

    def prefers_lut(self, tokens: int) -> bool:
        return self.codebook_size <= LUT_MAX_CODEBOOK and tokens <= LUT_MAX_TOKENS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._lut_matmul(x2) if self.prefers_lut(x2.shape[0]) else self._dequant_matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        groups, ogs = self.codes.shape[0], self.out_group_size
        step = max(1, BLOCK_WEIGHTS // (self.in_features * ogs))
        if step >= groups:
            return F.linear(x, self.dequantize(x.dtype))
        y = x.new_empty(x.shape[0], self.out_features)
        for start in range(0, groups, step):
            stop = min(groups, start + step)
            y[:, start * ogs : stop * ogs] = F.linear(x, self.dequantize(x.dtype, slice(start, stop)))
        return y

    def _lut_matmul(self, x: torch.Tensor) -> torch.Tensor:
        k, size, ogs, igs = self.codebooks.shape
        groups, in_groups = self.codes.shape[:2]
        tokens = x.shape[0]
        vectors = self._codebooks_in(x.dtype).reshape(k * size * ogs, igs)
        # lut[t, (h, k, e), a] = <x[t, input group h], codebooks[k, e, a, :]>
        lut = torch.matmul(x.reshape(tokens * in_groups, igs), vectors.T).view(
            tokens, in_groups * k * size, ogs
        )
        index = self._index(
            slice(None), per_group=True, reuse=not (torch.is_grad_enabled() and x.requires_grad)
        )
        index = index.view(groups, in_groups * k)
        # one bag per output group, one token at a time: embedding_bag's fast path takes a table of
        # contiguous rows (a [N, tokens] table of all tokens at once runs ~30x slower, measured)
        y = torch.stack([F.embedding_bag(index, lut[t], mode="sum") for t in range(tokens)])
        y = y * self.scales.view(1, groups, 1).to(x.dtype)
        return y.reshape(tokens, groups * ogs)
