"""GPTQ and AWQ layers as ``quantplug.IntegerGrid`` s and back (``Quantizer.integer_grid`` /
``Quantizer.encode_grid``): the packed int32 words unpacked to signed codes and zero points, and the
grid packed again bit for bit, so a layer rebuilt from its own grid holds exactly its tensors.

GPTQ (GPTQModel's v2 layout in memory): ``qweight`` [in * bits / 32, out] packs inputs, ``qzeros``
[groups, out * bits / 32] packs outputs, code ``j`` of a word at bits ``j * bits``; ``weight = (q - z)
* s`` with unsigned ``q``, ``z``. Act-order (``desc_act``) layers keep their inputs in input order
and say each one's group in ``g_idx``: their grid lists the inputs sorted by group (``columns``).

AWQ (gemm): ``qweight`` [in, out / 8] and ``qzeros`` [groups, out / 8] both pack outputs, eight 4-bit
codes a word in AutoAWQ's interleaved order (``AWQ_ORDER``, GPTQModel's ``pack_awq``).
"""

from __future__ import annotations

import torch

import quantplug

#: nibble ``j`` of an AWQ gemm word holds output ``8 * k + AWQ_ORDER[j]`` (GPTQModel's / AutoAWQ's order)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_REVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))


def unpack_last(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., n] -> unsigned int64 codes [..., n * 32 / bits], code ``j`` of a word at bit ``j * bits``."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    return ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def pack_last(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., n] (n * bits a multiple of 32) -> int32 words [..., n * bits / 32]."""
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int64)
    per_word = codes.to(torch.int64).unflatten(-1, (-1, 32 // bits))
    words = (per_word << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _bias(layer) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def gptq_grid(layer, sym: bool, desc_act: bool) -> quantplug.IntegerGrid | str:
    """The grid of a ``GptqLinear`` (zero points in v2), or why it is not one."""
    bits, in_f, out_f = layer.bits, layer.in_features, layer.out_features
    if 32 % bits:
        return f"{bits}-bit GPTQ packing spans int32 words; integer grids read 2, 4 and 8 bits"
    if (in_f * bits) % 32 or (out_f * bits) % 32:
        return f"its {in_f} inputs x {out_f} outputs leave partly filled int32 words of {bits}-bit codes"
    group = layer.group_size if layer.group_size > 0 else in_f
    if layer.qzero_format() != 2:
        return "its zero points are not in GPTQModel's v2 layout in memory"
    groups = -(-in_f // group)  # a partial last group (576 inputs in groups of 128) is a grid's too
    g_idx = layer.g_idx.to(torch.int64)
    columns = None
    if not torch.equal(g_idx, torch.arange(in_f, device=g_idx.device) // group):
        if not desc_act:
            return (
                "its g_idx puts inputs out of group order, but its config says desc_act=false (kernels that "
                "read the config would ignore g_idx)"
            )
        counts = torch.bincount(g_idx, minlength=groups)
        sizes = torch.full((groups,), group, device=counts.device)
        sizes[-1] = in_f - (groups - 1) * group
        if counts.numel() != groups or not torch.equal(counts, sizes):
            return f"act-order: its g_idx does not put {group} inputs in each of its {groups} groups (the last: the rest)"
        columns = torch.argsort(g_idx, stable=True)
    half = 1 << (bits - 1)
    codes = unpack_last(layer.qweight.t(), bits)  # [out, in], input order
    if columns is not None:
        codes = codes[:, columns]
    zero = (unpack_last(layer.qzeros, bits)[:, :out_f].t() - half).to(torch.int8).contiguous()
    if sym:
        if zero.any():
            return (
                f"its config says sym=true, but not every zero point is the middle code {half}: an asymmetric "
                f"layer under a symmetric label"
            )
        zero = None
    return quantplug.IntegerGrid(
        (codes - half).to(torch.int8).contiguous(),
        layer.scales.t().contiguous(),
        zero,
        bits,
        group,
        _bias(layer),
        columns,
    )


def _check_fits(name: str, what: str, module, grid, bits: int, group: int) -> None:
    """Shape, bits, group size, integer zero points and bias of ``grid`` against the target layer."""

    def refuse(why: str):
        return quantplug.PluginError(f"{name}: {what} cannot hold its integer grid: {why}")

    out_f, in_f = grid.codes.shape
    if (out_f, in_f) != (module.out_features, module.in_features):
        raise refuse(
            f"the grid is [{out_f}, {in_f}], the layer [{module.out_features}, {module.in_features}]"
        )
    if grid.bits != bits:
        raise refuse(f"the grid has {grid.bits}-bit codes, the config {bits}-bit")
    if grid.group_size != group:
        raise refuse(f"the grid's group size is {grid.group_size}, the config's {group} (for {in_f} inputs)")
    if grid.float_zero:
        raise refuse(
            "its zero points are floats; this format stores integer zero points (requantize instead)"
        )
    if (grid.bias is None) != (module.bias is None):
        has = "has a bias" if grid.bias is not None else "has no bias"
        raise refuse(f"the grid {has}, the layer {'has one' if module.bias is not None else 'has none'}")


def gptq_tensors(name: str, module, grid, config) -> dict[str, torch.Tensor]:
    """The v2 tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``) holding ``grid``."""
    bits, in_f, out_f = config.bits, module.in_features, module.out_features
    group = config.group_size if config.group_size > 0 else in_f
    what = f"GPTQ ({bits}-bit, group_size {config.group_size}, sym={config.sym}, desc_act={config.desc_act})"
    grid.check(name)
    _check_fits(name, what, module, grid, bits, group)

    def refuse(why: str):
        return quantplug.PluginError(f"{name}: {what} cannot hold its integer grid: {why}")

    if 32 % bits:
        raise refuse(
            f"GPTQ's {bits}-bit packing spans int32 words; integer grids are packed in 2, 4 and 8 bits"
        )
    if (in_f * bits) % 32 or (out_f * bits) % 32:
        raise refuse(f"{in_f} inputs x {out_f} outputs of {bits}-bit codes do not fill whole int32 words")
    if grid.columns is not None and not config.desc_act:
        raise refuse("its codes are in act-order (columns), and the config says desc_act=false")
    if config.sym and grid.zero_point is not None and grid.zero_point.any():
        raise refuse("it has zero points, and the config says sym=true (every zero point the middle code)")
    half, device = 1 << (bits - 1), grid.codes.device
    codes = grid.codes.to(torch.int64) + half
    g_idx = torch.arange(in_f, device=device) // group
    if grid.columns is not None:
        natural = torch.empty_like(codes)
        natural[:, grid.columns] = codes
        codes = natural
        g_idx = torch.empty_like(g_idx).index_put_((grid.columns,), g_idx)
    zero = grid.zero_point if grid.zero_point is not None else torch.zeros_like(grid.scale, dtype=torch.int8)
    out = {
        "qweight": pack_last(codes, bits).t().contiguous(),  # [out, in] -> [in * bits / 32, out]
        "qzeros": pack_last(zero.to(torch.int64).t() + half, bits).contiguous(),
        "scales": grid.scale.t().contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }
    if grid.bias is not None:
        out["bias"] = grid.bias.detach().clone()
    return out


def awq_grid(layer) -> quantplug.IntegerGrid | str:
    """The grid of an ``AwqLinear`` (gemm layout; always asymmetric: its zero points are stored)."""
    bits, in_f, out_f = layer.bits, layer.in_features, layer.out_features
    if bits != 4:
        return f"AWQ's {bits}-bit gemm packing: integer grids read its 4-bit layout"
    if out_f % 8:
        return f"its {out_f} outputs leave a partly filled int32 word of 4-bit codes"
    group = layer.group_size if layer.group_size > 0 else in_f
    if in_f % group:
        return f"its last group is partial ({in_f} inputs, group_size {group})"
    codes, zeros = (_awq_unpack(t) for t in (layer.qweight, layer.qzeros))
    return quantplug.IntegerGrid(
        (codes.t() - 8).to(torch.int8).contiguous(),
        layer.scales.t().contiguous(),
        (zeros.t() - 8).to(torch.int8).contiguous(),
        bits,
        group,
        _bias(layer),
    )


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """AWQ gemm words [rows, out / 8] -> unsigned 4-bit codes [rows, out] in output order."""
    raw = unpack_last(words, 4).unflatten(-1, (-1, 8))
    return raw[..., list(_AWQ_REVERSE)].flatten(-2)


def awq_tensors(name: str, module, grid, config) -> dict[str, torch.Tensor]:
    """The gemm tensors (``qweight``, ``qzeros``, ``scales``, ``bias``) holding ``grid``; a grid without
    zero points (symmetric) is stored with AWQ's middle zero point 8."""
    in_f, out_f = module.in_features, module.out_features
    group = config.group_size if config.group_size > 0 else in_f
    what = f"AWQ gemm ({config.bits}-bit, group_size {config.group_size})"
    grid.check(name)
    _check_fits(name, what, module, grid, config.bits, group)
    if grid.columns is not None:
        raise quantplug.PluginError(
            f"{name}: {what} cannot hold its integer grid: its codes are in act-order (columns), which AWQ "
            f"checkpoints do not have"
        )
    if out_f % 8:
        raise quantplug.PluginError(
            f"{name}: {what} cannot hold its integer grid: {out_f} outputs are not a multiple of 8"
        )
    zero = grid.zero_point if grid.zero_point is not None else torch.zeros_like(grid.scale, dtype=torch.int8)
    out = {
        "qweight": _awq_pack(grid.codes.t()),
        "qzeros": _awq_pack(zero.t()),
        "scales": grid.scale.t().contiguous(),
    }
    if grid.bias is not None:
        out["bias"] = grid.bias.detach().clone()
    return out


def _awq_pack(signed: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes [rows, out] -> AWQ gemm words [rows, out / 8]."""
    natural = (signed.to(torch.int64) + 8).unflatten(-1, (-1, 8))
    return pack_last(natural[..., list(AWQ_ORDER)].flatten(-2), 4).contiguous()
