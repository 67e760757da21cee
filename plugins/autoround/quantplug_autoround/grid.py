"""auto-round's packed checkpoint tensors as a ``quantplug.IntegerGrid`` and back, bit for bit.

Three packings (``AutoRoundConfig.packing``), all int32 words holding ``32 / bits`` codes, lowest
bits first, codes unsigned ``0 .. 2**bits - 1``:

- ``auto_round:auto_gptq`` (auto-round's ``qlinear_torch_zp``): ``qweight [in * bits / 32, out]``
  packed along the inputs, ``qzeros [groups, out * bits / 32]`` packed along the outputs holding
  ``zero - 1`` (GPTQ's v1 convention: a zero point of 0 cannot be stored), ``scales [groups, out]``;
- ``auto_round`` (``qlinear_torch``): the same layout with the zero point itself in ``qzeros``;
- ``auto_round:auto_awq`` (AWQ's ``WQLinear_GEMM``, 4 bits): ``qweight [in, out * bits / 32]`` and
  ``qzeros`` both packed along the outputs in AWQ's interleaved order (0, 4, 1, 5, 2, 6, 3, 7).

Only word-aligned widths (2, 4, 8 bits) are grids here: 3, 5, 6 and 7-bit codes straddle words in
auto-round's own bit-stream layouts, which this module does not decode (a reason string says so).
Every bit of a word holds a code, so decoding and re-packing gives the stored words back exactly.
"""

from __future__ import annotations

import torch

import quantplug

#: AWQ's order of the eight 4-bit codes in a word: code j sits at bit ``AWQ_ORDER[j] * 4``
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _layout(packing: str, bits: int) -> tuple[str, int] | str:
    """(kind, zero offset) of a packing, kind "gptq" (packed along the inputs) or "awq"; or why not."""
    if "awq" in packing:
        if bits != 4:
            return (
                f"{bits}-bit AWQ packing ({packing}) is not a word-aligned 4-bit layout this plugin decodes"
            )
        return "awq", 0
    if 32 % bits:
        return (
            f"its {bits}-bit codes straddle int32 words in auto-round's {packing} packing; only 2, 4 and "
            f"8 bits are read as integer grids"
        )
    return "gptq", -1 if "gptq" in packing else 0


def _shifts(kind: str, bits: int) -> torch.Tensor:
    order = AWQ_ORDER if kind == "awq" else range(32 // bits)
    return torch.tensor([j * bits for j in order], dtype=torch.int64)


def _unpack_cols(words: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """[n, m * bits / 32] int32 words -> [n, m] int64 codes (packed along dim 1)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> _shifts(kind, bits).to(w.device)) & ((1 << bits) - 1)
    return codes.reshape(w.shape[0], -1)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[n * bits / 32, m] int32 words -> [n, m] int64 codes (packed along dim 0)."""
    return _unpack_cols(words.t(), "gptq", bits).t()


def _pack_cols(codes: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """[n, m] codes (0 .. 2**bits - 1) -> [n, m * bits / 32] int32 words, as auto-round packs them."""
    per = 32 // bits
    c = codes.to(torch.int64).reshape(codes.shape[0], -1, per)
    words = (c << _shifts(kind, bits).to(c.device)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return _pack_cols(codes.t(), "gptq", bits).t().contiguous()


def integer_grid(config, name: str, tensors: dict[str, torch.Tensor]) -> quantplug.IntegerGrid | str:
    """The grid auto-round's checkpoint tensors of layer ``name`` hold, or why they are not one."""
    scheme = config.layer_scheme(name)
    bits, sym = scheme["bits"], scheme["sym"]
    layout = _layout(config.packing, bits)
    if isinstance(layout, str):
        return layout
    kind, offset = layout
    if not {"qweight", "qzeros", "scales"} <= set(tensors):
        return f"its tensors ({sorted(tensors)}) are not auto-round's qweight / qzeros / scales"
    scales = tensors["scales"]
    groups, out_f = scales.shape
    if kind == "awq":
        codes = _unpack_cols(tensors["qweight"], kind, bits).t()
    else:
        codes = _unpack_rows(tensors["qweight"], bits).t()
    in_f = codes.shape[1]
    if in_f % groups:
        return f"its last group is partial ({in_f} inputs in {groups} groups)"
    group = in_f // groups
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_f, device=g_idx.device) // group):
        return "act-order: its g_idx puts inputs out of group order, which auto-round's packing here does not decode"
    half = 1 << (bits - 1)
    zero = _unpack_cols(tensors["qzeros"], kind, bits)[:, :out_f].t() - offset - half
    if int(zero.max()) >= half:
        return f"a stored zero point of {2**bits - 1} means {2**bits} in GPTQ's v1 packing, outside the {bits}-bit range"
    bias = tensors.get("bias")
    return quantplug.IntegerGrid(
        (codes - half).to(torch.int8).contiguous(),
        scales.t().contiguous(),
        None if sym and not zero.any() else zero.to(torch.int8).contiguous(),
        bits,
        group,
        bias,
    )


def encode_tensors(
    config, name: str, module: torch.nn.Linear, grid: quantplug.IntegerGrid, expected: dict
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors auto-round would store for ``grid`` (keys / dtypes: ``expected``, the
    quantizer's ``expected_tensors``); ``PluginError`` for a grid the config cannot hold."""
    scheme = config.layer_scheme(name)
    bits, sym = scheme["bits"], scheme["sym"]
    in_f, out_f = module.in_features, module.out_features
    group = scheme["group_size"] if scheme["group_size"] != -1 else in_f

    def refuse(why: str) -> quantplug.PluginError:
        return quantplug.PluginError(
            f"auto-round layer {name!r} ({config.packing}, {bits}-bit, group_size {scheme['group_size']}, "
            f"sym={sym}) cannot hold this integer grid: {why}"
        )

    layout = _layout(config.packing, bits)
    if isinstance(layout, str):
        raise refuse(layout)
    kind, offset = layout
    grid.check(name)
    if tuple(grid.codes.shape) != (out_f, in_f):
        raise refuse(f"its codes are {list(grid.codes.shape)}, the layer is [{out_f}, {in_f}]")
    if grid.bits != bits or grid.group_size != group:
        raise refuse(f"the grid is {grid.bits}-bit with groups of {grid.group_size}")
    if grid.columns is not None:
        raise refuse("act-order (columns): auto-round's packing keeps the inputs in order")
    if grid.float_zero:
        raise refuse("float zero points; auto-round stores integer zero points")
    if sym and grid.zero_point is not None and grid.zero_point.any():
        raise refuse("it has zero points but the layer is symmetric")
    if (grid.bias is None) != (module.bias is None):
        raise refuse(f"the grid {'has no' if grid.bias is None else 'has a'} bias, the layer does not agree")
    half = 1 << (bits - 1)
    zero = (
        grid.zero_point.to(torch.int64)
        if grid.zero_point is not None
        else torch.zeros_like(grid.scale, dtype=torch.int64)
    )
    stored = zero + half + offset
    if int(stored.min()) < 0:
        raise refuse(f"a zero point of {-half} (unsigned 0), which GPTQ's v1 packing (zero - 1) cannot store")
    scale_dtype = expected["scales"][1]
    scales = grid.scale.t().contiguous().to(scale_dtype)
    if not torch.equal(scales.to(grid.scale.dtype), grid.scale.t()):
        raise refuse(
            f"its {grid.scale.dtype} scales are not exact in {scale_dtype}, which the checkpoint stores"
        )
    codes = grid.codes.to(torch.int64) + half
    tensors = {
        "qweight": _pack_cols(codes.t(), kind, bits) if kind == "awq" else _pack_rows(codes.t(), bits),
        "qzeros": _pack_cols(stored.t(), kind, bits),
        "scales": scales,
    }
    if "g_idx" in expected:
        tensors["g_idx"] = (torch.arange(in_f) // group).to(expected["g_idx"][1] or torch.int32)
    if grid.bias is not None:
        tensors["bias"] = grid.bias
    missing = set(expected) - set(tensors)
    if missing:
        raise refuse(f"its checkpoint format also needs {sorted(missing)}, which the grid does not give")
    return tensors


class GridMixin:
    """``Quantizer.integer_grid`` / ``encode_grid`` of ``AutoRoundQuantizer``: the grid is read off
    the checkpoint tensors the layer keeps (``module_tensors``), and ``encode_grid`` packs a grid
    into those tensors and builds the layer from them with ``load_module``, as a load does."""

    def integer_grid(self, name: str, qmodule: torch.nn.Module) -> quantplug.IntegerGrid | str:
        if not hasattr(qmodule, "qweight"):
            return f"{type(qmodule).__name__} is not an auto-round layer of this plugin"
        return integer_grid(self.config, name, self.module_tensors(name, qmodule))

    def encode_grid(self, name: str, module: torch.nn.Linear, grid: quantplug.IntegerGrid) -> torch.nn.Module:
        expected = self.expected_tensors(name, module)
        return self.load_module(name, module, encode_tensors(self.config, name, module, grid, expected))
