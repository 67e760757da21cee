"""The native path for MoE experts: what a backend implements to quantize a stacked experts module
as a whole (one quantized 3-D tensor per projection, a grouped kernel) instead of the core's
fallback, which unfuses the experts into per-expert ``nn.Linear`` modules and needs nothing from
the backend.

A backend opts in with ``Capabilities(native_experts=True)`` and implements ``quantize_experts``
and ``empty_experts`` on its ``Quantizer`` (the rest have defaults, as for Linear layers). The core
then leaves each experts module stacked and hands it over whole, with its ``ExpertsLayout``
(``quantplug.experts``: the number of experts, the sizes and Transformers' layout flags); the
module the backend returns must be called as the one it replaces
(``forward(hidden_states, top_k_index, top_k_weights)``). Quantize, quantize-on-load, pre-quantized
loads, save, device-map planning and the Transformers bridge all go through ``site_*`` below, which
send a Linear to the Linear methods and an experts module to these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import PluginError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .experts import ExpertsLayout


class StoredLayerMethods:
    """Mixed into ``quantplug.Quantizer`` (through ``ExpertsMethods``): what a pre-quantized
    checkpoint may hold besides the backend's quantized layers."""

    def stored_full_precision(self, name: str) -> str | None:
        """Why a checkpoint of this format may store layer ``name`` in full precision (only a float
        ``weight`` and ``bias``) although its config does not list it in ``modules_to_not_convert``,
        or None (default) when that is a broken checkpoint. Transformers' FP8 writer, for one,
        leaves the layers whose shape its tiles do not divide unquantized. Such a layer is loaded in
        full precision and reported in ``QuantizeReport.skipped`` with this reason."""
        return None


class ExpertsMethods(StoredLayerMethods):
    """Mixed into ``quantplug.Quantizer``: the methods of the native experts path."""

    def serves_experts(self, name: str, layout: ExpertsLayout) -> bool:
        """Whether this backend quantizes experts module ``name`` (of ``layout``) stacked, through
        ``quantize_experts``; False: the core unfuses it into per-expert Linears for
        ``quantize_module``, as for any backend. Asked only of backends declaring
        ``Capabilities.native_experts``; default True (every layout)."""
        return True

    def quantize_experts(self, name: str, module: nn.Module, layout: ExpertsLayout) -> nn.Module:
        """The quantized replacement of the stacked experts module ``module`` (on the target device),
        called as ``module`` is. Only for backends declaring ``Capabilities.native_experts``."""
        raise PluginError(
            f"backend {self.backend.name!r} declares native_experts but its quantizer does not implement "
            f"quantize_experts(); report this to the maintainers of {self.backend.plugin or 'the plugin'}"
        )

    def empty_experts(self, name: str, module: nn.Module, layout: ExpertsLayout) -> nn.Module:
        """What ``quantize_experts`` would return for ``module`` (the stacked module on the meta
        device), with uninitialized tensors: its ``state_dict()`` is what a checkpoint holds."""
        raise PluginError(
            f"backend {self.backend.name!r} declares native_experts but its quantizer does not implement "
            f"empty_experts(); report this to the maintainers of {self.backend.plugin or 'the plugin'}"
        )

    def experts_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that represent quantized experts ``qmodule`` in a checkpoint. Default: its
        ``state_dict()``."""
        return dict(qmodule.state_dict())

    def expected_experts_tensors(
        self, name: str, module: nn.Module, layout: ExpertsLayout
    ) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]]:
        """Keys, shapes and dtypes a checkpoint holds for the experts ``module`` (meta). Default:
        read off ``empty_experts``."""
        empty = self.empty_experts(name, module, layout)
        return {k: (tuple(t.shape), t.dtype) for k, t in empty.state_dict().items()}

    def load_experts(
        self, name: str, module: nn.Module, layout: ExpertsLayout, tensors: dict[str, torch.Tensor]
    ) -> nn.Module:
        """Quantized experts rebuilt from their checkpoint tensors. Default: ``empty_experts``
        with the tensors assigned."""
        qmodule = self.empty_experts(name, module, layout)
        qmodule.load_state_dict(tensors, strict=True, assign=True)
        return qmodule


def _layout(walk: Any, name: str):
    return getattr(walk, "native_experts", {}).get(name) if walk is not None else None


def site_quantize(walk: Any, name: str, module: nn.Module) -> nn.Module:
    """``quantize_module`` for a Linear (or Conv1D), ``quantize_experts`` for a native experts site."""
    from .layers import as_linear

    layout = _layout(walk, name)
    if layout is not None:
        return walk.quantizer.quantize_experts(name, module, layout)
    return walk.quantizer.quantize_module(name, as_linear(module))


def site_empty(walk: Any, name: str, meta: nn.Module) -> nn.Module:
    layout = _layout(walk, name)
    if layout is not None:
        return walk.quantizer.empty_experts(name, meta, layout)
    return walk.quantizer.empty_module(name, meta)


def site_expected(walk: Any, name: str, meta: nn.Module) -> dict:
    layout = _layout(walk, name)
    if layout is not None:
        return walk.quantizer.expected_experts_tensors(name, meta, layout)
    return walk.quantizer.expected_tensors(name, meta)


def site_load(walk: Any, name: str, meta: nn.Module, tensors: dict) -> nn.Module:
    layout = _layout(walk, name)
    if layout is not None:
        return walk.quantizer.load_experts(name, meta, layout, tensors)
    return walk.quantizer.load_module(name, meta, tensors)


def site_tensors(quantizer: Any, name: str, qmodule: nn.Module, native: dict) -> dict:
    """What ``save`` writes for quantized site ``name`` (``native``: the native experts sites)."""
    if name in native:
        return quantizer.experts_tensors(name, qmodule)
    return quantizer.module_tensors(name, qmodule)
