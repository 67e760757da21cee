"""hqq's ``HQQLinear`` as a ``quantplug.IntegerGrid`` and back, bit for bit.

hqq stores ``W = (W_q - zero) * scale`` with the weight regrouped to ``[out * in / group_size,
group_size]`` rows (axis=1: each row one group of inputs of one output), ``W_q`` unsigned codes
packed by hqq's packer (4 bits: the first half of the rows in the high nibbles, the second half in
the low ones; 8 bits: as they are), and ``scale`` / ``zero`` ``[rows, 1]`` floats in the compute
dtype. A grid's codes are signed, so ``codes = W_q - 2**(bits-1)`` and ``zero_point = zero -
2**(bits-1)`` (a float zero point, in the scale's dtype). Only 4 and 8 bits grouped along the inputs
(axis=1) with plain float scale / zero are such a grid; a layer whose shifted zero point is not exact
in its dtype (it would not come back bit for bit) says so instead.
"""

from __future__ import annotations

import torch
from hqq.core.quantize import HQQLinear
from hqq.core.quantize import Quantizer as HqqLibQuantizer

import quantplug

PACKINGS = {4: "4bit_u8", 8: "8bit_u8"}


def _why_not(meta: dict, shape: tuple[int, int]) -> str | None:
    nbits = meta.get("nbits")
    if nbits not in PACKINGS:
        return f"{nbits}-bit HQQ codes: only 4 and 8 bits are read as integer grids"
    if meta.get("axis") != 1:
        return "HQQ axis=0 groups run along the outputs, not the inputs"
    for key in ("quant_scale", "quant_zero", "offload_meta"):
        if meta.get(key):
            return f"its {key} is set (quantized or offloaded scale / zero), not a plain affine grid"
    if "zero_scale" in meta or "zero_q" in meta or "scale_q" in meta:
        return "its scale / zero are packed or quantized (zero_scale / zero_q / scale_q)"
    if meta.get("packing") != PACKINGS[nbits]:
        return f"its packing {meta.get('packing')!r} is not hqq's {PACKINGS[nbits]!r}"
    out_f, in_f = shape
    group = meta.get("group_size") or in_f
    if in_f % group or tuple(meta["scale"].shape) != (out_f * in_f // group, 1):
        return f"its scale {list(meta['scale'].shape)} is not one per group of {group} inputs"
    return None


def integer_grid(name: str, qmodule) -> quantplug.IntegerGrid | str:
    if not isinstance(qmodule, HQQLinear) or not getattr(qmodule, "ready", False):
        return f"{type(qmodule).__name__} is not a quantized HQQLinear"
    meta = qmodule.meta
    out_f, in_f = (int(s) for s in meta["shape"])
    why = _why_not(meta, (out_f, in_f))
    if why:
        return why
    bits = meta["nbits"]
    group = meta.get("group_size") or in_f
    w_q = qmodule.W_q.view(meta["unpack_view_dtype"]) if meta["view_as_float"] else qmodule.W_q
    codes = HqqLibQuantizer.unpack[meta["packing"]](w_q, dtype=torch.uint8)
    half = 1 << (bits - 1)
    scale, zero = meta["scale"], meta["zero"]
    zero_point = zero - half  # in zero's dtype (the compute dtype) where that is exact,
    if zero.dtype != scale.dtype or not torch.equal(zero_point + half, zero):
        zero_point = (
            zero.float() - half
        )  # else in float32 (HQQ's optimized zeros: 3.92 - 8 loses a bit in bf16)
        if not torch.equal((zero_point + half).to(zero.dtype), zero):
            return (
                f"its zero points are not exact in float32 once shifted by {half} (they would not round-trip)"
            )
    bias = qmodule.bias
    return quantplug.IntegerGrid(
        (codes.reshape(out_f, in_f).to(torch.int16) - half).to(torch.int8),
        scale.reshape(out_f, -1),
        zero_point.reshape(out_f, -1),
        bits,
        group,
        None if bias is None else bias.detach(),
    )


def encode_weights(
    name: str, module: torch.nn.Linear, settings: dict, grid: quantplug.IntegerGrid
) -> dict[str, torch.Tensor]:
    """hqq's ``W_q`` / ``scale`` / ``zero`` / ``bias`` for ``grid``; ``PluginError`` for a grid the
    layer's settings cannot hold."""
    nbits, axis = settings["nbits"], settings["axis"]
    out_f, in_f, dtype = module.out_features, module.in_features, module.weight.dtype
    group = settings["group_size"] or in_f

    def refuse(why: str) -> quantplug.PluginError:
        return quantplug.PluginError(
            f"HQQ layer {name!r} ({nbits}-bit, group_size {settings['group_size']}, axis={axis}) cannot hold "
            f"this integer grid: {why}"
        )

    if nbits not in PACKINGS or axis != 1:
        raise refuse("only 4 and 8-bit layers grouped along the inputs (axis=1) are integer grids")
    grid.check(name)
    if tuple(grid.codes.shape) != (out_f, in_f):
        raise refuse(f"its codes are {list(grid.codes.shape)}, the layer is [{out_f}, {in_f}]")
    if grid.bits != nbits or grid.group_size != group:
        raise refuse(f"the grid is {grid.bits}-bit with groups of {grid.group_size}")
    if grid.columns is not None:
        raise refuse("act-order (columns): HQQ keeps the inputs in order")
    if (grid.bias is None) != (module.bias is None):
        raise refuse(f"the grid {'has no' if grid.bias is None else 'has a'} bias, the layer does not agree")
    half = 1 << (nbits - 1)
    scale = grid.scale.to(dtype)
    zero = (
        torch.full_like(scale, half)
        if grid.zero_point is None
        else (
            (grid.zero_point.float() + half).to(dtype)
            if grid.float_zero
            else (grid.zero_point.to(torch.int16) + half).to(dtype)
        )
    )
    if not torch.equal(scale.to(grid.scale.dtype), grid.scale) or (
        grid.float_zero and not torch.equal((zero.float() - half).to(grid.zero_point.dtype), grid.zero_point)
    ):
        raise refuse(f"its {grid.scale.dtype} scale / zero point are not exact in the layer's {dtype}")
    codes = (grid.codes.to(torch.int16) + half).to(torch.uint8).reshape(-1, group)
    w_q = HqqLibQuantizer.pack[PACKINGS[nbits]](codes)
    if settings["view_as_float"]:
        w_q = w_q.view(dtype)
    out = {"W_q": w_q, "scale": scale.reshape(-1, 1), "zero": zero.reshape(-1, 1)}
    if grid.bias is not None:
        out["bias"] = grid.bias.to(dtype)  # hqq keeps the bias in the compute dtype
    return out
