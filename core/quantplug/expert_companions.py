"""The tensors stored beside each expert's weight (a block scale ``{e}.{proj}.weight_scale_inv``, a
row scale ``weight_scale``, a static ``activation_scale``...) for experts a backend keeps stacked.

Transformers names a stacked companion after its parameter: per-expert ``{e}.gate_proj.weight{x}``
and ``{e}.up_proj.weight{x}`` become ``gate_up_proj{x}`` (``x`` = ``_scale_inv`` for fine-grained
FP8's ``FP8Experts``, ``_scale`` for FBGEMM's), ``{e}.down_proj.weight{x}`` becomes ``down_proj{x}``.
The stacked companion is ``[E, rows, cols]``: per expert, the gate's 2-D tensor over the up's (a
scalar counts as ``[1, 1]``), as the weights of a concatenated layout lie. ``stack_companions``
presents per-expert checkpoints so (load), ``split_companions`` writes them back (save), for
non-transposed concatenated layouts (the ones Transformers' quantized experts classes use).
"""

from __future__ import annotations

import math

import torch

from .checkpoint import Checkpoint, Derived
from .errors import CheckpointError
from .experts import ExpertsLayout

__all__ = ["slice_companions", "split_companions", "stack_companions", "splits_per_expert"]


def splits_per_expert(layout: ExpertsLayout) -> bool:
    """Whether companions of ``layout`` stack and split as this module describes."""
    return layout.is_concatenated and not layout.is_transposed


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) < 2:
        return 1, math.prod(shape)
    raise ValueError(shape)


def stack_companions(
    ckpt: Checkpoint,
    name: str,
    layout: ExpertsLayout,
    per_expert: dict[tuple[int, str], str],
    leaves: dict[str, list[str]],
) -> tuple[dict[str, Derived], set[str]]:
    """Views presenting experts ``name``'s per-expert companions stacked (``per_expert``: (expert,
    role) -> stored module name; ``leaves``: stored module name -> its tensor names), and the stored
    keys they consume. A companion some expert lacks, or of another shape, is named."""
    if not splits_per_expert(layout):
        return {}, set()
    first = per_expert[(0, layout.projections()[0])]
    extras = [leaf for leaf in leaves.get(first, ()) if leaf.startswith("weight") and leaf != "weight"]
    views: dict[str, Derived] = {}
    consumed: set[str] = set()
    params = {"down": "down_proj"} | {
        role: layout.up_param for role in layout.projections() if role != "down"
    }
    for leaf in extras:
        suffix = leaf[len("weight") :]
        for param in dict.fromkeys(params.values()):
            roles = [r for r in layout.projections() if params[r] == param]
            parts = {(e, r): f"{per_expert[(e, r)]}.{leaf}" for e in range(layout.num_experts) for r in roles}
            views[f"{name}.{param}{suffix}"] = _stacked(ckpt, f"{name}.{param}{suffix}", layout, roles, parts)
            consumed.update(parts.values())
    return views, consumed


def _stacked(ckpt: Checkpoint, target: str, layout: ExpertsLayout, roles: list[str], parts: dict) -> Derived:
    have = ckpt.keys()
    missing = [k for k in parts.values() if k not in have]
    if missing:
        raise CheckpointError(
            f"{ckpt.folder}: tensor {missing[0]!r} is missing ({len(missing)} of the {len(parts)} per-expert "
            f"tensors that make {target}); every expert's projections store the same tensors"
        )
    shapes = {k: _as_2d(tuple(ckpt.spec(k)[0])) for k in parts.values()}
    rows = {r: shapes[parts[(0, r)]][0] for r in roles}
    cols = shapes[parts[(0, roles[0])]][1]
    for (_, r), key in parts.items():
        if shapes[key] != (rows[r], cols):
            raise CheckpointError(
                f"{ckpt.folder}: tensor {ckpt.stored_name.get(key, key)!r} has shape "
                f"{list(ckpt.spec(key)[0])}, expected {[rows[r], cols]} (as expert 0's; stacked into {target})"
            )
    dtypes = {ckpt.spec(k)[1] for k in parts.values()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    shape = (layout.num_experts, sum(rows.values()), cols)

    def build(read) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        for e in range(layout.num_experts):
            start = 0
            for r in roles:
                out[e, start : start + rows[r]].copy_(read(parts[(e, r)]).reshape(rows[r], cols))
                start += rows[r]
        return out

    return Derived(shape, dtype, build)


def split_companions(
    site: str, layout: ExpertsLayout, proj: dict[str, str], key: str, t: torch.Tensor
) -> list[tuple[str, torch.Tensor]] | None:
    """Stacked tensor ``key`` of native experts ``site`` (its weight ``{param}`` or a companion
    ``{param}{x}``) as per-expert ``{site}.{e}.{proj}.weight{x}`` tensors (``proj``: role -> the
    per-expert name), or None when ``key`` is not one (a backend's own stacked tensor)."""
    if not splits_per_expert(layout) or t.dim() != 3 or t.shape[0] != layout.num_experts:
        return None
    leaf = key[len(site) + 1 :]
    for param, roles in (
        (layout.up_param, [r for r in layout.projections() if r != "down"]),
        ("down_proj", ["down"]),
    ):
        if leaf != param and not leaf.startswith(param + "_"):
            continue
        suffix = leaf[len(param) :]
        if suffix.startswith("_bias") or t.shape[1] % len(roles):
            return None
        out = []
        for e in range(layout.num_experts):
            for i, piece in enumerate(t[e].chunk(len(roles), dim=0)):
                out.append((f"{site}.{e}.{proj[roles[i]]}.weight{suffix}", piece.contiguous()))
        return out
    return None


def slice_companions(
    ckpt: Checkpoint,
    name: str,
    layout: ExpertsLayout,
    per_expert: dict[tuple[int, str], str],
    leaves: list[str],
) -> tuple[dict[str, Derived], set[str]]:
    """Views presenting a stacked checkpoint's per-row companions (one value per output row of each
    expert: FBGEMM's Llama-4 ``gate_up_proj_scale`` [E, 1, 2I] and ``down_proj_scale`` [E, H, 1]) as
    each unfused expert's ``{e}.{proj}.weight{x}`` [out, 1] (``per_expert``: (expert, role) -> the
    per-expert module name; ``leaves``: the stored tensor names under ``name``). Companions of other
    shapes are left as they are (the load names them as unexpected)."""
    params = {"down": "down_proj"} | {
        role: layout.up_param for role in layout.projections() if role != "down"
    }
    views: dict[str, Derived] = {}
    consumed: set[str] = set()
    for param in dict.fromkeys(params.values()):
        roles = [r for r in layout.projections() if params[r] == param]
        rows = sum(layout.shape(r)[0] for r in roles)
        for leaf in leaves:
            if not leaf.startswith(param + "_") or leaf.startswith(param + "_bias"):
                continue
            stored = f"{name}.{leaf}"
            shape, dtype = ckpt.spec(stored)
            if len(shape) < 2 or shape[0] != layout.num_experts or math.prod(shape[1:]) != rows:
                continue
            for r in roles:
                for e in range(layout.num_experts):
                    target = f"{per_expert[(e, r)]}.weight{leaf[len(param) :]}"
                    views[target] = _row_view(stored, dtype, layout, e, r, len(roles) > 1)
            consumed.add(stored)
    return views, consumed


def _row_view(
    stored: str, dtype: torch.dtype, layout: ExpertsLayout, e: int, role: str, joined: bool
) -> Derived:
    out = layout.shape(role)[0]

    def build(read) -> torch.Tensor:
        flat = read(stored, e).reshape(-1)
        if joined:  # gate and up share the stacked tensor: halves, or interleaved rows
            first = role == "gate"
            if layout.is_concatenated:
                flat = flat[:out] if first else flat[out:]
            else:
                flat = flat[0::2] if first else flat[1::2]
        return flat.reshape(out, 1).contiguous()

    return Derived((out, 1), dtype, build)
