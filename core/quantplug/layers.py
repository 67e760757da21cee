"""Model structure: which layers quantization may replace, which it leaves alone by default, and
the plan for one config. Looks at structure and shapes only, so it works on meta-device skeletons.

Eligible modules are exactly ``nn.Linear`` and Transformers' ``Conv1D`` (GPT-2 style, weight stored
transposed; handed to the backend as the equivalent ``nn.Linear``). Subclasses of ``nn.Linear``
(a backend's own modules, adapters) are never touched, so quantizing twice is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .matching import listed_reason


def is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def is_eligible(module: nn.Module) -> bool:
    return type(module) is nn.Linear or is_conv1d(module)


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function as ``module`` (``module`` itself if it is one)."""
    if type(module) is nn.Linear:
        w = module.weight
        if w.device.type == "meta" or (w.is_contiguous() and w.untyped_storage().nbytes() == w.nbytes):
            return module
        # an expert's view of stacked MoE weights: the backend gets a tensor of its own (copied one
        # expert at a time), so nothing it keeps holds the whole stack and no kernel reads a view
        # (bitsandbytes' CPU int8 forward computed other outputs from one than its saved state)
        lin = as_linear_meta(module)
        lin.weight = nn.Parameter(w.detach().contiguous(), requires_grad=w.requires_grad)
        if module.bias is not None:
            lin.bias = nn.Parameter(
                module.bias.detach().contiguous(), requires_grad=module.bias.requires_grad
            )
        return lin
    lin = as_linear_meta(module)  # Conv1D: weight stored [in, out]
    lin.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return lin


def transformers_tied_keys(model: nn.Module) -> dict[str, str]:
    """Transformers' tied parameters that this model really ties (target key -> source key)."""
    keys = getattr(model, "all_tied_weights_keys", None)  # Transformers 5: already honours the config
    if isinstance(keys, dict):
        return dict(keys)
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict) and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return dict(keys)
    return {}


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Linear modules whose weight shares storage with an earlier parameter: name -> the other name."""
    seen: dict[int, str] = {}
    tied = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.device.type == "meta":
            continue
        key = p.data_ptr()
        if key in seen and pname.endswith(".weight"):
            tied[pname[: -len(".weight")]] = seen[key]
        seen.setdefault(key, pname)
    for target, source in transformers_tied_keys(model).items():  # also meaningful on meta skeletons
        if target.endswith(".weight"):
            tied.setdefault(target[: -len(".weight")], source)
    return tied


def default_skips(model: nn.Module) -> dict[str, str]:
    """Modules left in full precision when ``modules_to_not_convert`` is None: the output head and
    any layer whose weight is tied to another parameter."""
    out = {}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        for name, mod in model.named_modules():
            if mod is head:
                out[name] = (
                    "output head (kept in full precision by default; set modules_to_not_convert=[] to quantize it)"
                )
    for name, other in _tied_names(model).items():
        out.setdefault(name, f"weight tied to {other}")
    return out


def default_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers ``quantize`` converts with a default config (eligible, not the output head, not
    tied), in model order, before any backend's ``skip_reason``."""
    skips = default_skips(model)
    return [(name, m) for name, m in model.named_modules() if name and is_eligible(m) and name not in skips]


def plan(model: nn.Module, config: QuantConfig, quantizer: Any) -> tuple[list[str], dict[str, str]]:
    """The modules to quantize (in model order) and the eligible ones skipped, with reasons.
    Works on meta-device skeletons too: it looks at structure and shapes only."""
    skips = default_skips(model) if config.modules_to_not_convert is None else {}
    convert, skipped = [], {}
    for name, module in model.named_modules():
        if not name or not is_eligible(module):
            continue
        why = (
            skips.get(name)
            or listed_reason(name, config)
            or quantizer.skip_reason(name, as_linear_meta(module))
        )
        if why:
            skipped[name] = why
        else:
            convert.append(name)
    return convert, skipped


def as_linear_meta(module: nn.Module) -> nn.Linear:
    """A meta-device ``nn.Linear`` with the shape, dtype and bias of ``module`` (no data)."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
    else:
        out_f, in_f = module.weight.shape
    lin = nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta", dtype=module.weight.dtype)
    return lin.train(module.training)  # a new module starts in training mode; keep the layer's


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def dotted_prefixes(key: str) -> list[str]:
    """The module names a tensor key lies under: ``"a.b.weight"`` -> ``["a", "a.b"]``."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def owner_of(key: str, names: set[str]) -> str | None:
    """The module of ``names`` that tensor ``key`` belongs to (a dotted prefix of it), or ``None``."""
    return next((p for p in dotted_prefixes(key) if p in names), None)
