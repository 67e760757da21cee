"""Mixture-of-experts weight sites: stacked experts modules, recognised by their layout, and the
core's fallback that unfuses them into one ``nn.Linear`` per expert projection.

Transformers 5 keeps an MoE layer's experts as two 3-D parameters (``gate_up_proj``,
``down_proj``) in a module decorated with ``transformers.integrations.moe.use_experts_implementation``,
whose ``__init__`` records the layout on the instance (``has_gate``, ``has_bias``,
``is_transposed``, ``is_concatenated``, ``has_post_expert_norm``). ``experts_layout`` reads those
flags, or the registry ``EXPERTS_CLASSES`` for undecorated classes (``Llama4TextExperts``).

``UnfusedExperts`` holds expert ``e``'s projections as ``{e}.{gate}``, ``{e}.{up}``, ``{e}.{down}``
(the names the model's checkpoints use: ``gate_proj``/``up_proj``/``down_proj``, Mixtral's
``w1``/``w3``/``w2``) and computes what the stacked module computes, with the model's own gate
function (``_apply_gate``: gpt-oss's clamped, interleaved SwiGLU) and biases. Every weight is a view
of the stacked tensor (no copy; a transposed or interleaved layout gives a strided view, made
contiguous one expert at a time when a backend quantizes it). ``fuse`` puts them back.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: flags ``use_experts_implementation`` sets on an experts instance, with Transformers' defaults
FLAGS = {
    "has_gate": True,
    "has_bias": False,
    "is_transposed": False,
    "is_concatenated": True,
    "has_post_expert_norm": False,
}

#: experts classes Transformers does not decorate: class name -> layout flags (plus ``routing``:
#: ``"all_tokens"`` for a forward that takes every token for every expert, pre-scaled, as
#: ``[E * tokens, hidden]``). ``register_experts_class`` adds to it.
EXPERTS_CLASSES: dict[str, dict[str, Any]] = {
    "Llama4TextExperts": {"is_transposed": True, "routing": "all_tokens"},
}

#: per-expert projection names when the model's conversion mapping names none
DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


def register_experts_class(class_name: str, **flags: Any) -> None:
    """Declare the layout of an experts class that is not decorated with Transformers'
    ``use_experts_implementation`` (flags as the decorator takes them, plus ``routing``)."""
    unknown = set(flags) - set(FLAGS) - {"routing"}
    if unknown:
        raise ValueError(
            f"register_experts_class: unknown flag(s) {sorted(unknown)}; known: {sorted(FLAGS)}, routing"
        )
    EXPERTS_CLASSES[class_name] = dict(flags)


@dataclasses.dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its weights (Transformers' layout flags and the sizes)."""

    num_experts: int
    hidden: int
    intermediate: int
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True
    has_post_expert_norm: bool = False
    routing: str = "top_k"

    @property
    def up_param(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"

    def projections(self) -> tuple[str, ...]:
        """The per-expert projections, by role: ``gate`` (if any), ``up``, ``down``."""
        return ("gate", "up", "down") if self.has_gate else ("up", "down")

    def shape(self, role: str) -> tuple[int, int]:
        """``(out_features, in_features)`` of one expert's ``role`` projection."""
        return (self.hidden, self.intermediate) if role == "down" else (self.intermediate, self.hidden)

    def slot(self, stacked: torch.Tensor, e: int, role: str, bias: bool = False) -> torch.Tensor:
        """The view of ``stacked`` (this layout's 3-D weight, or 2-D bias, of ``role``'s parameter)
        that holds expert ``e``'s ``role`` weight as ``[out, in]`` (or its bias as ``[out]``)."""
        t = stacked[e]
        if role == "down":
            return t if bias or not self.is_transposed else t.t()
        if not bias and self.is_transposed:
            t = t.t()  # [2I or I, H]
        if not self.has_gate:
            return t
        first = role == "gate"
        if self.is_concatenated:
            n = self.intermediate
            return t[:n] if first else t[n:]
        return t[0::2] if first else t[1::2]


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a stacked experts module, or ``None`` when ``module`` is not one quantplug
    knows (see ``unknown_stacked``)."""
    flags = dict(FLAGS)
    registered = EXPERTS_CLASSES.get(type(module).__name__)
    if registered is not None:
        flags.update(registered)
    elif all(hasattr(module, f) for f in ("has_gate", "is_transposed", "is_concatenated", "has_bias")):
        flags.update({f: bool(getattr(module, f, d)) for f, d in FLAGS.items()})
    else:
        return None
    up = module._parameters.get("gate_up_proj" if flags["has_gate"] else "up_proj")
    down = module._parameters.get("down_proj")
    if up is None or down is None or up.dim() != 3 or down.dim() != 3 or up.shape[0] != down.shape[0]:
        return None
    (u, h), (h2, i) = (up.shape[1:], down.shape[1:])
    if flags["is_transposed"]:
        (h, u), (i, h2) = (up.shape[1:], down.shape[1:])
    inter = u // 2 if flags["has_gate"] else u
    if h != h2 or i != inter or (flags["has_gate"] and u != 2 * i):
        return None
    layout = ExpertsLayout(int(up.shape[0]), int(h), int(i), **flags)
    if layout.has_bias:
        for param, n in ((layout.up_param, u), ("down_proj", h)):
            b = module._parameters.get(param + "_bias")
            if b is None or tuple(b.shape) != (layout.num_experts, n):
                return None
    return layout


def is_unfused(module: nn.Module) -> bool:
    return isinstance(module, UnfusedExperts)


def experts_sites(model: nn.Module) -> dict[str, ExpertsLayout]:
    """Every stacked experts module of ``model`` quantplug knows, by name, in model order."""
    out = {}
    for name, module in model.named_modules():
        layout = experts_layout(module) if name else None
        if layout is not None:
            out[name] = layout
    return out


def stacked_weights(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The stacked expert weights (not biases) of every experts module still fused in ``model``:
    module name -> its 3-D weights. A quantizer that unfuses them leaves none."""
    out = {}
    for name, layout in experts_sites(model).items():
        module = model.get_submodule(name)
        out[name] = [module._parameters[layout.up_param], module._parameters["down_proj"]]
    return out


def unknown_stacked(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Modules that look like stacked experts (a parameter of 3 or more dimensions named ``*_proj``,
    or ``expert`` in the module's name or class) in a layout quantplug does not know: name ->
    (class name, bytes of those parameters). Convolutions and other 3-D parameters are not weights
    quantization converts, and are left out."""
    known = set(experts_sites(model))
    out = {}
    for name, module in model.named_modules():
        if name in known or is_unfused(module) or isinstance(module, nn.modules.conv._ConvNd):
            continue
        big = {k: p for k, p in module._parameters.items() if p is not None and p.dim() >= 3}
        looks = "expert" in name.rpartition(".")[2].lower() or "expert" in type(module).__name__.lower()
        if big and (looks or any(k.endswith("_proj") for k in big)):
            out[name] = (type(module).__name__, sum(p.numel() * p.element_size() for p in big.values()))
    return out


class ExpertMLP(nn.Module):
    """One expert's projections as ``nn.Linear`` modules, under the checkpoint's names."""

    def __init__(self, names: dict[str, str], linears: dict[str, nn.Module]):
        super().__init__()
        self._roles = dict(names)  # role -> attribute name
        for role, name in names.items():
            self.add_module(name, linears[role])

    def proj(self, role: str) -> nn.Module:
        return self._modules[self._roles[role]]


class UnfusedExperts(nn.Module):
    """A stacked experts module as one ``ExpertMLP`` per expert (children ``"0"`` … ``"E-1"``),
    computing what the stacked module computes. Called as the module it replaces:
    ``(hidden_states, top_k_index, top_k_weights)``, or ``(hidden_states)`` for the all-tokens
    routing of ``Llama4TextExperts``."""

    def __init__(
        self, layout: ExpertsLayout, experts: list[ExpertMLP], gate_fn: Callable, carried: dict[str, Any]
    ):
        super().__init__()
        self.layout = layout
        self.num_experts = layout.num_experts
        self.stored_prefix: str | None = None
        """Where the checkpoint it was loaded from keeps its experts, when not Transformers' layout."""
        self.all_tokens = False
        """Set by ``all_experts_see_all_tokens`` while a quantizer calibrates."""
        self._gate_fn = gate_fn
        for key, value in carried.items():
            setattr(self, key, value)  # act_fn, alpha, limit, post_expert_norm, ...
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def _mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        expert, layout = self.expert(e), self.layout
        up = expert.proj("up")(x)
        if layout.has_gate:
            gate = expert.proj("gate")(x)
            if layout.is_concatenated:
                joined = torch.cat([gate, up], dim=-1)
            else:
                # interleaved [g0, u0, g1, u1, ...]; cat, not stack (quanto's activations have no stack)
                joined = torch.cat([gate.unsqueeze(-1), up.unsqueeze(-1)], dim=-1).flatten(-2)
            h = self._gate_fn(self, joined)
        else:
            h = self.act_fn(up)
        out = expert.proj("down")(h)
        if layout.has_post_expert_norm:
            out = self.post_expert_norm(out)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index=None, top_k_weights=None) -> torch.Tensor:
        if self.layout.routing == "all_tokens":
            x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
            return torch.cat([self._mlp(e, x[e]) for e in range(self.num_experts)]).view(-1, x.shape[-1])
        if self.all_tokens:  # calibration: every expert sees every token, only routed ones count
            out = torch.zeros_like(hidden_states)
            flat = top_k_index.reshape(top_k_index.shape[0], -1)
            for e in range(self.num_experts):
                token_idx, k_pos = torch.where(flat == e)
                y = self._mlp(e, hidden_states)[token_idx] * top_k_weights[token_idx, k_pos, None]
                out.index_add_(0, token_idx, y.to(out.dtype))
            return out
        return route_top_k(hidden_states, top_k_index, top_k_weights, self.num_experts, self._mlp)


def route_top_k(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    mlp: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """What a top-k experts module returns: for each expert some token is routed to, in expert
    order (as Transformers' eager loop sums them), ``mlp(e, tokens)`` times those tokens' routing
    weights, added up per token. A decode step (one token) reads its k experts with one host sync,
    a longer input one per layer; indices outside ``0 .. num_experts - 1`` (another rank's experts)
    are skipped. For backends that keep experts stacked: their module's forward is this with their
    own ``mlp``."""
    out = torch.zeros_like(hidden_states)
    flat = top_k_index.reshape(top_k_index.shape[0], -1)
    if hidden_states.shape[0] == 1:
        ks = flat[0].tolist()
        weights = top_k_weights.reshape(1, -1)
        for e in sorted(set(ks)):
            if 0 <= e < num_experts:
                k = ks.index(e)
                out += (mlp(e, hidden_states) * weights[:, k : k + 1]).to(out.dtype)
        return out
    hits = torch.bincount(flat.flatten().clamp_min(0), minlength=num_experts)[:num_experts]
    for e in hits.nonzero().flatten().tolist():
        token_idx, k_pos = torch.where(flat == e)
        y = mlp(e, hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


@contextlib.contextmanager
def all_experts_see_all_tokens(model: nn.Module) -> Iterator[None]:
    """While calibrating: every unfused expert computes on every token (its outputs for tokens not
    routed to it are dropped, so the model's outputs are unchanged), so each expert's calibration
    statistics come from all the calibration text, not the few tokens routed to it (as
    llm-compressor's ``moe_calibration_context`` and GPTQModel do)."""
    experts = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    for m in experts:
        m.all_tokens = True
    try:
        yield
    finally:
        for m in experts:
            m.all_tokens = False


def _default_gate(self: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return lin


def unfuse(
    module: nn.Module, layout: ExpertsLayout, names: tuple[str, str, str] = DEFAULT_NAMES
) -> UnfusedExperts:
    """``module``'s experts as an ``UnfusedExperts`` whose Linear weights are views of its stacked
    parameters (meta tensors stay meta). ``names``: the checkpoint's (gate, up, down) names."""
    role_names = dict(zip(("gate", "up", "down"), names, strict=True))
    if not layout.has_gate:
        role_names.pop("gate")
    params = {"up": module._parameters[layout.up_param], "down": module._parameters["down_proj"]}
    params["gate"] = params["up"]
    biases = {}
    if layout.has_bias:
        biases = {
            "up": module._parameters[layout.up_param + "_bias"],
            "down": module._parameters["down_proj_bias"],
        }
        biases["gate"] = biases["up"]
    experts = []
    for e in range(layout.num_experts):
        linears = {}
        for role in role_names:
            p = params[role]
            w = layout.slot(p.detach(), e, role)
            b = layout.slot(biases[role].detach(), e, role, bias=True) if biases else None
            linears[role] = _linear(w, b, p.requires_grad)
        experts.append(ExpertMLP(role_names, linears))
    carried = {k: v for k, v in module._modules.items() if v is not None}
    carried.update(
        {
            k: v
            for k, v in vars(module).items()
            if not k.startswith("_") and k not in ("training",) and k not in FLAGS
        }
    )
    carried.pop("num_experts", None)
    gate_fn = getattr(type(module), "_apply_gate", _default_gate)
    # in the mode of the module it replaces (new modules start in training mode: bitsandbytes' int8
    # matmul, for one, treats outliers differently when training)
    return UnfusedExperts(layout, experts, gate_fn, carried).train(module.training)


def fuse(unfused: UnfusedExperts, into: nn.Module) -> nn.Module:
    """Fill the stacked module ``into`` (e.g. the meta module ``unfused`` replaced) from
    ``unfused``'s full-precision Linears; returns ``into``."""
    layout = unfused.layout
    first = unfused.expert(0).proj("up").weight
    up_rows = 2 * layout.intermediate if layout.has_gate else layout.intermediate
    shapes = {layout.up_param: (up_rows, layout.hidden), "down_proj": (layout.hidden, layout.intermediate)}
    for param, (out_f, in_f) in shapes.items():
        old = into._parameters[param]
        full = (
            (layout.num_experts, in_f, out_f) if layout.is_transposed else (layout.num_experts, out_f, in_f)
        )
        stacked = torch.empty(full, dtype=first.dtype, device=first.device)
        bias = (
            torch.empty(layout.num_experts, out_f, dtype=first.dtype, device=first.device)
            if layout.has_bias
            else None
        )
        roles = ("down",) if param == "down_proj" else layout.projections()[:-1]
        for e in range(layout.num_experts):
            for role in roles:
                lin = unfused.expert(e).proj(role)
                layout.slot(stacked, e, role).copy_(lin.weight)
                if bias is not None:
                    layout.slot(bias, e, role, bias=True).copy_(lin.bias)
        into._parameters[param] = nn.Parameter(stacked, requires_grad=old.requires_grad)
        if bias is not None:
            into._parameters[param + "_bias"] = nn.Parameter(bias, requires_grad=old.requires_grad)
    for key, value in unfused._modules.items():  # carried modules (a post-expert norm) come back
        if not key.isdigit():
            into._modules[key] = value
    return into
