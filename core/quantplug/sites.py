"""Weight sites beyond ``nn.Linear``: what the walk, the loader and ``save`` do with stacked MoE
experts (``quantplug.experts``).

- ``unfuse_sites``: before a quantizer plans a model, each experts module it does not serve
  natively becomes an ``UnfusedExperts`` (per-expert ``nn.Linear`` views, named as the checkpoint
  names them); ``restore_unplanned`` puts back those of which the plan quantizes nothing.
- ``stacked_skips``: stacked weights quantplug cannot unfuse, reported with their bytes (never a
  silent 0.92x).
- ``present_checkpoint``: the checkpoint's tensors under the model's names (the model's conversion
  mapping's renamings), each experts site read from per-expert tensors or from stacked ones,
  whichever the checkpoint holds and the model needs (one expert read at a time).
- ``checkpoint_layout``: the tensors ``save`` writes, in the layout Transformers' ``save_pretrained``
  writes (stacked experts split per expert where the model's mapping stacks them, names renamed back).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, Derived
from .errors import CheckpointError
from .expert_companions import slice_companions, split_companions, stack_companions
from .expert_names import CheckpointNames
from .experts import (
    DEFAULT_NAMES,
    ExpertsLayout,
    UnfusedExperts,
    experts_sites,
    is_unfused,
    unfuse,
    unknown_stacked,
)
from .layers import dotted_prefixes, set_submodule

__all__ = ["checkpoint_layout", "present_checkpoint", "restore_unplanned", "stacked_skips", "unfuse_sites"]


def serves_experts_natively(quantizer: Any) -> bool:
    """Whether ``quantizer``'s backend quantizes stacked experts itself (``Capabilities.native_experts``)."""
    caps = getattr(getattr(quantizer, "backend", None), "capabilities", None)
    return bool(getattr(caps, "native_experts", False))


def unfuse_sites(
    model: nn.Module, quantizer: Any = None, stored: set[str] | None = None
) -> dict[str, nn.Module]:
    """Unfuse every experts module of ``model`` (in place; views, no copies) unless ``quantizer``
    serves them natively. Returns the replaced modules by name, for ``restore_unplanned``.
    ``stored``: a checkpoint's tensor names; its experts are named as it names them (the model's
    conversion mapping's names, or ``gate_proj``/``up_proj``/``down_proj``, which llm-compressor
    writes for Mixtral too)."""
    native = quantizer is not None and serves_experts_natively(quantizer)
    sites = {
        n: lo for n, lo in experts_sites(model).items() if not (native and quantizer.serves_experts(n, lo))
    }
    if not sites:
        return {}
    names = CheckpointNames(model)
    modules = None if stored is None else {p for k in stored for p in dotted_prefixes(k)}
    originals = {}
    for name, layout in sites.items():
        module = model.get_submodule(name)
        proj, prefix = _stored_naming(names, name, layout, modules)
        unfused = unfuse(module, layout, proj)
        unfused.stored_prefix = prefix
        set_submodule(model, name, unfused)
        originals[name] = module
    return originals


def _stored_naming(
    names: CheckpointNames, site: str, layout: ExpertsLayout, stored: set[str] | None
) -> tuple[tuple[str, str, str], str | None]:
    """The per-expert (gate, up, down) names of experts ``site`` and the prefix the checkpoint
    keeps them under: the model's conversion mapping's (Transformers' layout) unless ``stored``
    (the module paths a checkpoint's tensor names lie under) holds them otherwise. Other tools write Mixtral three ways:
    Transformers ``block_sparse_moe.experts.{e}.w1``, auto-round and llm-compressor
    ``block_sparse_moe.experts.{e}.gate_proj``, GPTQModel ``mlp.experts.{e}.gate_proj``; ``save``
    writes back the prefix that was read (``None``: Transformers' renaming)."""
    proj = names.projection_names(site, layout.has_gate)[0]
    if stored is None:
        return proj, None
    for prefix in dict.fromkeys((names.to_checkpoint(site), site)):
        for candidate in dict.fromkeys((proj, DEFAULT_NAMES)):
            if f"{prefix}.0.{candidate[2]}" in stored:
                return candidate, prefix
    return proj, None


def native_sites(model: nn.Module, quantizer: Any, skipped: dict[str, str]) -> dict[str, ExpertsLayout]:
    """The experts modules ``quantizer`` quantizes stacked (a backend with ``native_experts``), by
    name; those ``modules_to_not_convert`` lists (or ``skip_reason`` refuses) go to ``skipped``."""
    if not serves_experts_natively(quantizer):
        return {}
    from .matching import listed_reason

    out = {}
    for name, layout in experts_sites(model).items():
        if not quantizer.serves_experts(name, layout):
            continue  # unfused by ``unfuse_sites``, unless planned to stay in full precision
        why = listed_reason(name, quantizer.config) or quantizer.skip_reason(name, model.get_submodule(name))
        if why:
            skipped[name] = why
        else:
            out[name] = layout
    return out


def restore_unplanned(model: nn.Module, originals: dict[str, nn.Module], planned: list[str]) -> None:
    """Put back each unfused experts module of which ``planned`` quantizes no projection."""
    for name, module in originals.items():
        if not any(p.startswith(name + ".") for p in planned):
            set_submodule(model, name, module)


def stacked_skips(model: nn.Module) -> dict[str, str]:
    """Stacked weights no walk can quantize: name -> why, with the bytes left in full precision."""
    return {
        name: (
            f"{cls}: stacked weights of a layout quantplug does not know ({size / 2**20:.1f} MiB left in "
            f"full precision); declare it with quantplug.register_experts_class if it is an "
            f"experts module"
        )
        for name, (cls, size) in unknown_stacked(model).items()
    }


def _role_params(layout: ExpertsLayout) -> dict[str, str]:
    return {role: "down_proj" if role == "down" else layout.up_param for role in layout.projections()}


def _per_expert_names(name: str, layout: ExpertsLayout, proj: dict[str, str]) -> dict[tuple[int, str], str]:
    return {
        (e, role): f"{name}.{e}.{proj[role]}"
        for e in range(layout.num_experts)
        for role in layout.projections()
    }


def present_checkpoint(model: nn.Module, ckpt: Checkpoint) -> None:
    """Present ``ckpt``'s tensors as ``model`` (with its experts fused or unfused) names them."""
    fused = experts_sites(model)
    unfused = {n: m for n, m in model.named_modules() if is_unfused(m)}
    if not fused and not unfused:
        return
    names = CheckpointNames(model)
    stored = ckpt.keys()
    renamed = {k: names.to_model(k) for k in stored}
    ckpt.present_as({k: v for k, v in renamed.items() if k != v})
    have = ckpt.keys()
    leaves: dict[str, list[str]] | None = None  # stored module name -> its tensor names
    for name, module in unfused.items():
        layout = module.layout
        params = _role_params(layout)
        if f"{name}.{layout.up_param}" not in have:
            continue  # stored per expert: read by name
        per_expert = _per_expert_names(name, layout, _proj_names(module))
        if leaves is None:
            leaves = _leaves(have)
        views, consumed = slice_companions(ckpt, name, layout, per_expert, leaves.get(name, []))
        for (e, role), key in per_expert.items():
            suffixes = (("weight", False), ("bias", True)) if layout.has_bias else (("weight", False),)
            for suffix, bias in suffixes:
                stored = f"{name}.{params[role]}" + ("_bias" if bias else "")
                consumed.add(stored)
                views[f"{key}.{suffix}"] = _slice_view(ckpt, stored, layout, e, role, bias)
        ckpt.derive(views, consumed)
    for name, layout in fused.items():
        suffixes = ("weight", "bias") if layout.has_bias else ("weight",)
        per_expert = None
        for proj in (names.projection_names(name, layout.has_gate)[0], DEFAULT_NAMES):
            candidate = _per_expert_names(name, layout, dict(zip(("gate", "up", "down"), proj, strict=True)))
            if all(f"{k}.{s}" in have for k in candidate.values() for s in suffixes):
                per_expert = candidate
                break
        if f"{name}.{layout.up_param}" in have or per_expert is None:
            continue  # stored stacked (read by name), or not whole (``verify`` names what is missing)
        views, consumed = {}, set()
        for param in dict.fromkeys(_role_params(layout).values()):
            for suffix in suffixes:
                parts = {
                    (e, role): f"{key}.{suffix}"
                    for (e, role), key in per_expert.items()
                    if _role_params(layout)[role] == param
                }
                consumed.update(parts.values())
                target = param + ("_bias" if suffix == "bias" else "")
                views[f"{name}.{target}"] = _stack_view(
                    ckpt, model, f"{name}.{target}", layout, parts, suffix == "bias"
                )
        if leaves is None:
            leaves = _leaves(have)
        more, used = stack_companions(ckpt, name, layout, per_expert, leaves)  # e.g. block scales
        views.update(more)
        ckpt.derive(views, consumed | used)


def _leaves(keys: set[str]) -> dict[str, list[str]]:
    """Stored module name -> the names of its tensors."""
    out: dict[str, list[str]] = {}
    for k in keys:
        module, _, leaf = k.rpartition(".")
        out.setdefault(module, []).append(leaf)
    return out


def _proj_names(module: UnfusedExperts) -> dict[str, str]:
    return dict(module.expert(0)._roles)


def _slice_view(
    ckpt: Checkpoint, stored: str, layout: ExpertsLayout, e: int, role: str, bias: bool
) -> Derived:
    _, dtype = ckpt.spec(stored)
    out_f, in_f = layout.shape(role)
    shape = (out_f,) if bias else (out_f, in_f)

    def build(read) -> torch.Tensor:
        one = read(stored, e).unsqueeze(0)  # [1, ...]: expert e only
        return layout.slot(one, 0, role, bias=bias).contiguous()

    return Derived(shape, dtype, build)


def _stack_view(
    ckpt: Checkpoint, model: nn.Module, target: str, layout: ExpertsLayout, parts: dict, bias: bool
) -> Derived:
    """The stacked parameter ``target`` built from its per-expert tensors ``parts`` (all stored); a
    misshapen part is named when it is read."""
    dtypes = {ckpt.spec(k)[1] for k in parts.values()}
    module, _, param = target.rpartition(".")
    shape = tuple(model.get_submodule(module)._parameters[param].shape)
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    for (_, role), key in parts.items():
        want = layout.shape(role)[:1] if bias else layout.shape(role)
        got = tuple(ckpt.spec(key)[0])
        if got != tuple(want):
            raise CheckpointError(
                f"{ckpt.folder}: tensor {ckpt.stored_name.get(key, key)!r} has shape {list(got)}, expected "
                f"{list(want)} (one expert's "
                f"{role} projection of {target.rpartition('.')[0]}: {layout.num_experts} experts, hidden "
                f"{layout.hidden}, intermediate {layout.intermediate})"
            )

    def build(read) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        for (e, role), key in parts.items():
            layout.slot(out, e, role, bias=bias).copy_(read(key))
        return out

    return Derived(shape, dtype, build)


def checkpoint_namer(model: nn.Module, names: CheckpointNames | None = None):
    """A function giving a model name its checkpoint name (``save``'s renaming; identity unless the
    model has experts): unfused experts keep the prefix their checkpoint had, the rest are renamed
    back as Transformers' ``save_pretrained`` renames them."""
    unfused = {n: m.stored_prefix for n, m in model.named_modules() if is_unfused(m)}
    native = getattr(getattr(model, "quantplug_info", None), "experts", None)  # quantized stacked
    if not experts_sites(model) and not unfused and not native:
        return lambda key: key
    to_checkpoint = (names or CheckpointNames(model)).to_checkpoint
    kept = {n: p for n, p in unfused.items() if p is not None}

    def rename(key: str) -> str:
        site = next((p for p in dotted_prefixes(key) if p in kept), None)
        return kept[site] + key[len(site) :] if site is not None else to_checkpoint(key)

    return rename


def checkpoint_layout(
    model: nn.Module,
    tensors: list[tuple[str, torch.Tensor]],
    aliases: dict[str, str],
    native: dict[str, ExpertsLayout] | None = None,
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """``tensors`` (model names, in order) and ``aliases`` as Transformers' ``save_pretrained``
    writes them: fused experts split per expert where the model's conversion mapping stacks them
    (``native``: experts a backend quantized stacked, whose weights and companions split so too),
    and every name renamed back to the checkpoint's."""
    fused = experts_sites(model)
    native = native or {}
    if not fused and not native and not any(is_unfused(m) for m in model.modules()):
        return tensors, aliases
    names = CheckpointNames(model)
    natively = {}  # native site -> (layout, role -> per-expert name) where the mapping stacks
    for name, layout in native.items():
        proj, stacks = names.projection_names(name, layout.has_gate)
        if stacks:
            natively[name] = (layout, dict(zip(("gate", "up", "down"), proj, strict=True)))
    rename = checkpoint_namer(model, names)  # one reading of the model's conversion mapping
    split: dict[str, tuple[str, ExpertsLayout, dict[str, str], bool]] = {}
    for name, layout in fused.items():
        proj, stacks = names.projection_names(name, layout.has_gate)
        if stacks:
            by_role = dict(zip(("gate", "up", "down"), proj, strict=True))
            for role, param in _role_params(layout).items():
                split.setdefault(f"{name}.{param}", (name, layout, {}, False))[2][role] = by_role[role]
                if layout.has_bias:
                    split.setdefault(f"{name}.{param}_bias", (name, layout, {}, True))[2][role] = by_role[
                        role
                    ]
    out = []
    for key, t in tensors:
        site = key.rpartition(".")[0]
        pieces = split_companions(site, *natively[site], key, t) if site in natively else None
        if pieces is not None:
            out.extend((rename(k), piece) for k, piece in pieces)
            continue
        if key not in split:
            out.append((rename(key), t))
            continue
        site, layout, roles, bias = split[key]
        for e in range(layout.num_experts):
            for role, proj in roles.items():
                piece = layout.slot(t, e, role, bias=bias).contiguous()
                out.append((rename(f"{site}.{e}.{proj}.{'bias' if bias else 'weight'}"), piece))
    renamed = {rename(a): rename(s) for a, s in aliases.items()}
    return out, renamed
