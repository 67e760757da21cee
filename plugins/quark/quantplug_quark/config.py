"""``QuarkConfig``: the ``quantization_config`` AMD Quark exports (``quant_method: "quark"``), as it
is in ``config.json``. Light: no torch, no amd-quark.

Keys (Quark 0.13's ``QConfig.to_dict`` plus ``export``):

- ``global_quant_config``: the layer config every Linear gets: ``{weight, input_tensors,
  output_tensors, bias, target_device}``, each a tensor spec (``dtype``, ``qscheme``, ``ch_axis``,
  ``group_size``, ``symmetric``, ``is_dynamic``, ``scale_format``, ...) or null;
- ``layer_quant_config``: module-name pattern -> layer config (first match wins), then
  ``layer_type_quant_config``: module type name (``"Linear"``) -> layer config;
- ``kv_cache_quant_config``: pattern (``"*k_proj"``) -> the layer config of those projections, whose
  ``output_tensors`` quantizes their outputs (the KV cache) (``scheme_for``);
- ``exclude``: module names / globs / ``re:`` regexes left in full precision;
- ``export``: ``{pack_method: "reorder" | "order", weight_format: "real_quantized", kv_cache_group,
  min_kv_scale, weight_merge_groups}``;
- ``quant_mode``, ``version``, ``algo_config`` (AWQ / GPTQ / SmoothQuant leave nothing to do at load
  time; rotations are refused), ``softmax_quant_spec`` and ``kv_cache_post_rope`` (refused when set).

Which schemes load is ``specs.py``'s business; an unsupported one raises ``ConfigError`` naming the
spec field, when the config is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import quantplug

from .specs import LayerScheme, check_layer, name_matches

EXPORT_KEYS = frozenset(
    {"pack_method", "weight_format", "kv_cache_group", "min_kv_scale", "weight_merge_groups"}
)
#: algorithms whose effect is folded into the exported weights (nothing to do when loading)
FOLDED_ALGOS = frozenset({"awq", "gptq", "smooth", "smoothquant", "autosmoothquant", "qronos", "gptaq"})
#: the layer types Quark 0.13 reloads a layer_type_quant_config for (QUARK_LAYER_TYPES)
LAYER_TYPES = ("Linear", "Conv2d", "ConvTranspose2d")


def _default_export() -> dict[str, Any]:
    return {"pack_method": "reorder", "weight_format": "real_quantized"}


@dataclasses.dataclass(frozen=True)
class QuarkConfig(quantplug.QuantConfig):
    """AMD Quark's exported ``quantization_config`` (see the module docstring)."""

    quant_method: ClassVar[str] = "quark"

    global_quant_config: dict[str, Any] | None = None
    layer_quant_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    layer_type_quant_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    kv_cache_quant_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    export: dict[str, Any] = dataclasses.field(default_factory=_default_export)
    quant_mode: Literal["eager_mode", "fx_graph_mode"] = "eager_mode"
    version: str | None = None
    algo_config: Any = None
    softmax_quant_spec: Any = None
    kv_cache_post_rope: bool = False

    def validate(self) -> None:
        if self.modules_to_not_convert is None:
            # Quark's own `exclude` says what stays in full precision (the output head included):
            # no default skips of quantplug's on top of it
            object.__setattr__(self, "modules_to_not_convert", ())
        self._check_export()
        if self.global_quant_config is not None:
            check_layer("global_quant_config", self.global_quant_config)
        unknown = sorted(set(self.layer_type_quant_config) - set(LAYER_TYPES))
        if unknown:
            raise self.invalid(
                "layer_type_quant_config", f"keys among {', '.join(LAYER_TYPES)}", f"{unknown[0]!r}"
            )
        for field in ("layer_quant_config", "layer_type_quant_config", "kv_cache_quant_config"):
            for key, layer in getattr(self, field).items():
                check_layer(f"{field}.{key}", layer)
        if self.quant_mode != "eager_mode":
            raise self.invalid("quant_mode", "'eager_mode'", "fx graph-mode exports are not read")
        if self.softmax_quant_spec is not None:
            raise self.invalid(
                "softmax_quant_spec", "null", "quantized attention softmax is not applied here"
            )
        if self.kv_cache_post_rope:
            raise self.invalid(
                "kv_cache_post_rope", "false", "post-RoPE KV-cache quantization is not applied here"
            )
        self._check_algos()

    def _check_export(self) -> None:
        unknown = sorted(set(self.export) - EXPORT_KEYS, key=str)
        if unknown:
            raise self.invalid(
                "export", f"keys {', '.join(sorted(EXPORT_KEYS))}", f"unknown key {unknown[0]!r}"
            )
        if self.export.get("pack_method", "reorder") not in ("reorder", "order"):
            raise quantplug.ConfigError(
                f"QuarkConfig: export.pack_method={self.export['pack_method']!r} is not supported; "
                f"allowed: 'reorder' or 'order'.",
                field="export.pack_method",
                value=self.export["pack_method"],
                allowed="'reorder' or 'order'",
            )
        if self.export.get("weight_format", "real_quantized") != "real_quantized":
            raise quantplug.ConfigError(
                f"QuarkConfig: export.weight_format={self.export['weight_format']!r} is not supported; "
                f"allowed: 'real_quantized' (a 'fake_quantized' export stores full-precision weights: load it "
                f"without quantplug-quark, as a plain model).",
                field="export.weight_format",
                value=self.export["weight_format"],
                allowed="'real_quantized'",
            )
        if self.export.get("weight_merge_groups"):
            raise self.invalid(
                "export", "weight_merge_groups null or empty", "merged-weight exports are not read"
            )

    def _check_algos(self) -> None:
        algos = self.algo_config
        if algos is None:
            return
        for i, algo in enumerate(algos if isinstance(algos, list) else [algos]):
            name = algo.get("name") if isinstance(algo, dict) else None
            if not isinstance(name, str) or name.lower() not in FOLDED_ALGOS:
                raise self.invalid(
                    "algo_config",
                    f"null, or algorithms folded into the weights ({', '.join(sorted(FOLDED_ALGOS))})",
                    f"entry {i} is {name!r}: rotations and other online transforms are not applied here",
                )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not out.get("modules_to_not_convert"):
            out.pop("modules_to_not_convert", None)  # (not Quark's key: written only when set)
        return out

    # -- per layer ------------------------------------------------------------------------------

    def excluded_by(self, name: str) -> str | None:
        """The ``exclude`` pattern that keeps module ``name`` in full precision, or ``None``."""
        return next((p for p in self.exclude if name_matches(name, p)), None)

    def scheme_for(self, name: str) -> LayerScheme | None:
        """The scheme Quark's ``ModelQuantizer`` gave Linear ``name`` (``None``: full precision), as
        ``quark.torch.quantization.model_transformation`` assigns it: the first ``layer_quant_config``
        pattern it matches, else ``layer_type_quant_config``'s ``Linear``, else ``global_quant_config``,
        unless ``exclude`` names it; then a matching ``kv_cache_quant_config`` entry replaces that (an
        excluded layer keeps only its ``output_tensors``, the weight in full precision).

        (Quark's re-import, ``quant_config_parser.get_layer_quant_config``, applies the KV-cache entry
        to excluded layers only, so Transformers drops the ``output_scale`` of a quantized
        ``k_proj`` / ``v_proj`` as unexpected; this follows the quantizer, and keeps every tensor.)"""
        excluded = self.excluded_by(name) is not None
        source, layer = "global_quant_config", self.global_quant_config
        hit = next((p for p in self.layer_quant_config if name_matches(name, p)), None)
        if hit is not None:
            source, layer = f"layer_quant_config.{hit}", self.layer_quant_config[hit]
        elif "Linear" in self.layer_type_quant_config:
            source, layer = "layer_type_quant_config.Linear", self.layer_type_quant_config["Linear"]
        kv = next((p for p in self.kv_cache_quant_config if name_matches(name, p)), None)
        if kv is not None:
            source, layer = f"kv_cache_quant_config.{kv}", self.kv_cache_quant_config[kv]
            if excluded:
                layer = {"output_tensors": (layer or {}).get("output_tensors")}
        elif excluded:
            return None
        specs = check_layer(source, layer)
        if not any(specs.values()):
            return None
        return LayerScheme(
            weight=specs["weight"],
            input=specs["input_tensors"],
            output=specs["output_tensors"],
            reorder=self.export.get("pack_method", "reorder") == "reorder",
            source=source,
        )
