"""``HqqConfig``: HQQ settings, with the key names of Transformers' ``HqqConfig``. Light: no torch,
no hqq.

Per-layer rules that need the layer's shape (``group_size`` must divide ``in_features``, ...) are
checked by the quantizer when a model is planned, and raise ``ConfigError`` naming the layer.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import quantplug
from quantplug.matching import matching_pattern

NBITS = (1, 2, 3, 4, 8)
LAYER_KEYS = ("nbits", "group_size", "axis", "view_as_float")
#: BaseQuantizeConfig keys hqq deprecated (quantized scale/zero, meta offloading): hqq cannot
#: serialize them, so they are refused rather than ignored.
DEPRECATED_KEYS = ("quant_zero", "quant_scale", "offload_meta")
#: what a dynamic_config entry's missing keys default to (hqq's BaseQuantizeConfig defaults)
DYNAMIC_DEFAULTS = {"nbits": 4, "group_size": 64, "axis": 1, "view_as_float": False}
#: how skip_modules and dynamic_config keys match module names: whole dotted components
#: (quantplug's rule) or Transformers' HQQ linear tag (``self_attn.q_proj``)
MATCH_RULES = ("components", "linear_tag")


def _group_size_problem(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
        return "null (one group per output row) or a positive multiple of 8 (hqq's rule)"
    return None


@dataclasses.dataclass(frozen=True)
class HqqConfig(quantplug.QuantConfig):
    """HQQ weight quantization (no calibration data).

    nbits           1, 2, 3, 4 or 8 bits per weight
    group_size      weights sharing one scale and zero point; a multiple of 8 that divides each
                    layer's ``in_features`` (``out_features`` when axis=0); null = a whole row
    axis            1 (groups along the input dimension; Transformers' default) or 0 (hqq's CUDA/ATen layout)
    view_as_float   store the packed codes viewed as the compute dtype (hqq's option for FSDP)
    dynamic_config  per-layer settings: {linear tag: {nbits, group_size, axis, view_as_float}};
                    tags are Transformers' (``self_attn.q_proj``, ``mlp.down_proj``). As in
                    Transformers, when given, layers whose tag is not listed stay in full precision.
    skip_modules    linear tags or module names left in full precision (Transformers' default ["lm_head"])
    """

    quant_method = "hqq"
    skip_aliases = ("skip_modules",)  # matched by quantplug's core, like modules_to_not_convert
    skip_rules = MATCH_RULES

    nbits: Literal[1, 2, 3, 4, 8] = 4
    group_size: int | None = 64
    axis: Literal[0, 1] = 1
    view_as_float: bool = False
    dynamic_config: dict[str, Any] | None = None
    skip_modules: tuple[str, ...] = ("lm_head",)

    def validate(self) -> None:
        why = _group_size_problem(self.group_size)
        if why:
            raise self.invalid("group_size", why)
        if self.dynamic_config is not None:
            for tag, entry in self.dynamic_config.items():
                problem = _layer_entry_problem(entry)
                if problem:
                    raise self.invalid(
                        "dynamic_config",
                        "{linear tag: {nbits: 1|2|3|4|8, group_size: multiple of 8 or null, "
                        "axis: 0|1, view_as_float: bool}}",
                        f"entry {tag!r}: {problem}",
                    )

    def __hash__(self) -> int:  # dynamic_config is a dict
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def layer_settings(self, name: str) -> dict[str, Any] | None:
        """nbits / group_size / axis / view_as_float for the layer ``name``, or None when
        ``dynamic_config`` leaves it out (it is then kept in full precision)."""
        if self.dynamic_config is None:
            return {
                "nbits": self.nbits,
                "group_size": self.group_size,
                "axis": self.axis,
                "view_as_float": self.view_as_float,
            }
        key = matching_pattern(name, self.dynamic_config, MATCH_RULES)
        if key is None:
            return None
        # Missing keys take hqq's BaseQuantizeConfig defaults, as in Transformers.
        return {**DYNAMIC_DEFAULTS, **self.dynamic_config[key]}

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> HqqConfig:
        """``nbits=bits`` with groups of 64 (divides the hidden sizes of most models)."""
        return cls(**{"nbits": bits, "group_size": 64, **overrides})


def _layer_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"must be a mapping, got {entry!r}"
    deprecated = sorted(k for k in entry if k in DEPRECATED_KEYS)
    if deprecated:
        return (
            f"{', '.join(deprecated)}: deprecated in hqq and not serializable; remove them "
            "(scale and zero point are kept in the compute dtype)"
        )
    unknown = sorted(str(k) for k in entry if k not in LAYER_KEYS)
    if unknown:
        return f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(LAYER_KEYS)}"
    nbits = entry.get("nbits", 4)
    if isinstance(nbits, bool) or nbits not in NBITS:
        return f"nbits={nbits!r}; allowed: {', '.join(map(str, NBITS))}"
    why = _group_size_problem(entry.get("group_size", 64))
    if why:
        return f"group_size={entry.get('group_size')!r}; allowed: {why}"
    axis = entry.get("axis", 1)
    if isinstance(axis, bool) or axis not in (0, 1):
        return f"axis={axis!r}; allowed: 0 or 1"
    if not isinstance(entry.get("view_as_float", False), bool):
        return f"view_as_float={entry['view_as_float']!r}; allowed: true or false"
    return None
