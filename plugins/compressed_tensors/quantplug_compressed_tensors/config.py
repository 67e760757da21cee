"""``CompressedTensorsConfig``: the ``quantization_config`` llm-compressor writes into ``config.json``
(``quant_method: compressed-tensors``), as a quantplug config.

Light: imports neither torch nor compressed-tensors (seconds to import). A hub checkpoint's
``quantization_config`` parses as it is; a quantplug user writes ``{"scheme": "W4A16"}`` (one of
``SCHEMES``, optionally with ``group_size`` and ``ignore``), which is expanded here into the
``config_groups`` llm-compressor would write, so ``to_dict()`` -- what ``quantplug.save`` puts in
``config.json`` -- is exactly llm-compressor's layout. What this plugin cannot apply (sparsity,
transforms, a quantized KV cache, output activations, FP4 / MX formats) is refused by name, never
loaded densely or ignored.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import quantplug

from .args import stored_dtype_problems
from .float8 import float8_config_fields, strategy_problems


def _weights(num_bits: int, type_: str, symmetric: bool, strategy: str, group_size: int | None) -> dict:
    return {
        "dynamic": False,
        "group_size": group_size,
        "num_bits": num_bits,
        "strategy": strategy,
        "symmetric": symmetric,
        "type": type_,
    }


def _activations(type_: str, strategy: str, dynamic: bool, observer: str | None = None) -> dict:
    out = {
        "dynamic": dynamic,
        "group_size": None,
        "num_bits": 8,
        "strategy": strategy,
        "symmetric": True,
        "type": type_,
    }
    if observer is not None:
        out["observer"] = observer
    return out


def _group(fmt: str, weights: dict, inputs: dict | None = None) -> dict:
    return {
        "format": fmt,
        "input_activations": inputs,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": weights,
    }


#: compressed-tensors' preset schemes this plugin writes, as ``config_groups`` entries exactly as
#: compressed-tensors 0.20 writes them (``preset_name_to_scheme(name, ["Linear"])`` plus the format its
#: compressor chooses; tests/test_config.py checks this table against the library).
SCHEMES: dict[str, dict[str, Any]] = {
    "W4A16": _group("pack-quantized", _weights(4, "int", True, "group", 128)),
    "W4A16_ASYM": _group("pack-quantized", _weights(4, "int", False, "group", 128)),
    "W8A16": _group("pack-quantized", _weights(8, "int", True, "group", 128)),
    "W8A8": _group(
        "int-quantized", _weights(8, "int", True, "channel", None), _activations("int", "token", True)
    ),
    "FP8": _group(
        "float-quantized",
        _weights(8, "float", True, "tensor", None),
        _activations("float", "tensor", False, "static_minmax"),
    ),
    "FP8_DYNAMIC": _group(
        "float-quantized", _weights(8, "float", True, "channel", None), _activations("float", "token", True)
    ),
}

#: what a config with neither ``scheme`` nor ``config_groups`` means
DEFAULT_SCHEME = "W4A16"

#: checkpoint formats whose tensors this plugin reads and writes
FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
WEIGHT_STRATEGIES = ("tensor", "channel", "group", "block")
ACTIVATION_STRATEGIES = ("tensor", "token", "group")


def infer_format(group: dict[str, Any]) -> str:
    """The format compressed-tensors' compressor picks for a scheme (``infer_module_format``):
    int weights with quantized int activations -> int-quantized; other int weights -> pack-quantized;
    float weights -> float-quantized."""
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    if weights.get("type") == "float":
        return "float-quantized"
    if inputs is not None and inputs.get("type", "int") == "int":
        return "int-quantized"
    return "pack-quantized"


@dataclasses.dataclass(frozen=True)
class CompressedTensorsConfig(quantplug.QuantConfig):
    """compressed-tensors quantization (the format of llm-compressor, served natively by vLLM).

    scheme              quantplug shorthand: one of W4A16, W4A16_ASYM, W8A16, W8A8, FP8, FP8_DYNAMIC
                        (compressed-tensors' preset names), expanded into ``config_groups``; W4A16
                        when neither scheme nor config_groups is given
    group_size          with ``scheme``: another group size for a group-wise scheme (W4A16, W8A16, ...)
    config_groups       llm-compressor's ``config_groups``: name -> {targets, weights, input_activations,
                        output_activations, format}
    ignore              module names (or ``re:`` regular expressions) left in full precision; with
                        ``scheme`` the default is ["lm_head"], as llm-compressor's examples do
    format              the checkpoint's compression format (derived from the groups when not given)
    quantization_status, version, global_compression_ratio, kv_cache_scheme, sparsity_config,
    transform_config, moe_sparsity_config   the rest of llm-compressor's keys (sparsity, transforms and
                        a KV-cache scheme are refused: this plugin cannot apply them)
    """

    quant_method = "compressed-tensors"
    skip_aliases: ClassVar[tuple[str, ...]] = ()

    config_groups: dict[str, Any] | None = None
    format: str | None = None
    ignore: tuple[str, ...] | None = None
    quantization_status: str = "compressed"
    kv_cache_scheme: dict[str, Any] | None = None
    sparsity_config: dict[str, Any] | None = None
    transform_config: dict[str, Any] | None = None
    moe_sparsity_config: dict[str, Any] | None = None
    global_compression_ratio: float | None = None
    version: str | None = None
    scheme: str | None = None
    group_size: int | None = None

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> CompressedTensorsConfig:
        names = {4: "W4A16", 8: "W8A16"}
        if bits not in names:
            raise quantplug.ConfigError(
                f"CompressedTensorsConfig: no scheme for {bits} bits; this plugin's integer schemes store 4 "
                f"(W4A16) or 8 (W8A16) bits",
                field="bits",
                value=bits,
                allowed=sorted(names),
            )
        return cls(scheme=names[bits], **overrides)

    @classmethod
    def for_grids(cls, layouts: dict[str, Any], unquantized: list[str]) -> CompressedTensorsConfig:
        """The config that holds these integer grids as they are (``quantplug.export``): one
        pack-quantized weight-only group per (bits, group size, symmetry); with a single group it
        targets ``Linear`` and ignores the layers left in full precision, as llm-compressor writes
        it, otherwise each group targets its layers by name."""
        # a layer with one group per row whose width equals another layer's group size (a 128-input
        # layer in a group-128 model) is that group scheme too: the stored tensors are the same
        grouped = {
            (lay.bits, lay.group_size, lay.symmetric) for lay in layouts.values() if not lay.per_channel
        }
        by_kind: dict[tuple, list[str]] = {}
        for name, layout in layouts.items():
            key = (layout.bits, layout.group_size, layout.symmetric)
            if layout.per_channel and key not in grouped:
                key = (layout.bits, None, layout.symmetric)
            by_kind.setdefault(key, []).append(name)
        groups = {}
        for i, ((bits, group_size, symmetric), names) in enumerate(by_kind.items()):
            weights = _weights(
                bits, "int", symmetric, "channel" if group_size is None else "group", group_size
            )
            group = _group("pack-quantized", weights)
            group["targets"] = ["Linear"] if len(by_kind) == 1 else list(names)
            groups[f"group_{i}"] = group
        ignore = list(unquantized) if len(by_kind) == 1 else []
        return cls(config_groups=groups, ignore=tuple(ignore))

    @classmethod
    def for_float8_grids(cls, layouts: dict[str, Any], unquantized: list[str]) -> CompressedTensorsConfig:
        """The config that holds these float8 grids as they are (``quantplug.export`` of fp8 /
        fbgemm_fp8 checkpoints): FP8_BLOCK, FP8_DYNAMIC or per-tensor FP8 groups (``float8.py``)."""
        return cls(**float8_config_fields(layouts, unquantized))

    def validate(self) -> None:
        self._expand_scheme()
        self._merge_skip_list()
        self._check_unsupported()
        groups = self.config_groups
        if not groups:
            raise self.invalid(
                "config_groups", "a non-empty mapping of group name -> scheme, or give scheme="
            )
        normalized = {}
        for name, group in groups.items():
            normalized[name] = self._checked_group(name, group)
        object.__setattr__(self, "config_groups", normalized)
        formats = sorted({g["format"] for g in normalized.values()})
        derived = formats[0] if len(formats) == 1 else "mixed-precision"
        if self.format is None:
            object.__setattr__(self, "format", derived)
        elif self.format not in (*FORMATS, "mixed-precision"):
            raise self.invalid(
                "format",
                ", ".join((*FORMATS, "mixed-precision")),
                "a compression format this plugin cannot read; it needs a plugin for that format",
            )
        elif self.format != derived and self.format != "mixed-precision":
            raise self.invalid("format", repr(derived), f"config_groups say {derived!r}")
        if self.version is None:
            object.__setattr__(self, "version", _library_version())
        for field in ("sparsity_config", "transform_config"):  # written as {} (what llm-compressor writes)
            if getattr(self, field) is None:
                object.__setattr__(self, field, {})

    def _expand_scheme(self) -> None:
        if self.scheme is None and self.config_groups is None:
            object.__setattr__(self, "scheme", DEFAULT_SCHEME)  # CompressedTensorsConfig() is W4A16
        if self.scheme is None:
            if self.group_size is not None:
                raise self.invalid(
                    "group_size", "null without scheme", "set group sizes inside config_groups"
                )
            if self.ignore is None:
                object.__setattr__(self, "ignore", ())
            return
        key = self.scheme.upper().replace("-", "_")
        if key not in SCHEMES:
            raise self.invalid("scheme", ", ".join(SCHEMES), "not a scheme this plugin knows")
        if self.config_groups is not None:
            raise self.invalid(
                "config_groups", "null when scheme is given", "give scheme or config_groups, not both"
            )
        group = copy.deepcopy(SCHEMES[key])
        if self.group_size is not None:
            if group["weights"]["strategy"] != "group":
                raise self.invalid(
                    "group_size",
                    "null",
                    f"{key} quantizes {group['weights']['strategy']}-wise, not in groups",
                )
            if self.group_size <= 0 or self.group_size % 8:
                raise self.invalid("group_size", "a positive multiple of 8 (e.g. 32, 64, 128)")
            group["weights"]["group_size"] = self.group_size
        object.__setattr__(self, "config_groups", {"group_0": group})
        object.__setattr__(self, "scheme", None)
        object.__setattr__(self, "group_size", None)
        if self.ignore is None:
            object.__setattr__(self, "ignore", ("lm_head",))

    def _merge_skip_list(self) -> None:
        """``modules_to_not_convert`` (quantplug's name) joins ``ignore`` (compressed-tensors' name);
        which modules are quantized is decided by ``config_groups`` targets and ``ignore`` only."""
        extra = tuple(n for n in (self.modules_to_not_convert or ()) if n not in (self.ignore or ()))
        object.__setattr__(self, "ignore", tuple(self.ignore or ()) + extra)
        object.__setattr__(self, "modules_to_not_convert", ())

    def _check_unsupported(self) -> None:
        if self.quantization_status != "compressed":
            raise self.invalid(
                "quantization_status",
                "'compressed'",
                "the checkpoint holds dense fake-quantized weights, not compressed ones; compress it with "
                "compressed-tensors' ModelCompressor first",
            )
        for field in ("sparsity_config", "transform_config"):
            value = getattr(self, field)
            if value:
                raise self.invalid(
                    field, "empty or null", "this plugin cannot apply it; loading densely would be wrong"
                )
        for field in ("kv_cache_scheme", "moe_sparsity_config"):
            if getattr(self, field) is not None:
                raise self.invalid(field, "null", "this plugin cannot apply it")

    def _checked_group(self, name: str, group: Any) -> dict[str, Any]:
        where = f"config_groups[{name!r}]"

        def bad(why: str) -> quantplug.ConfigError:
            return quantplug.ConfigError(
                f"CompressedTensorsConfig: {where}: {why}", field="config_groups", value=group
            )

        if not isinstance(group, dict):
            raise bad("must be a mapping with targets and weights")
        group = copy.deepcopy(group)
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise bad(
                f"targets must be a non-empty list of module class names or 're:' patterns, got {targets!r}"
            )
        weights = group.get("weights")
        if not isinstance(weights, dict):
            raise bad("weights must be given (activation-only quantization is not supported)")
        if group.get("output_activations") is not None:
            raise bad("output_activations are not supported (no plugin applies them)")
        kind, bits = weights.get("type"), weights.get("num_bits")
        if kind == "int":
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise bad(f"weights.num_bits={bits!r}: integer weights of 2 to 8 bits are supported")
        elif kind == "float":
            if bits != 8:
                raise bad(
                    f"weights.num_bits={bits!r}: only 8-bit float weights (FP8 E4M3) are supported, not FP4"
                )
        else:
            raise bad(f"weights.type={kind!r}: 'int' or 'float'")
        strategy = weights.get("strategy")
        if strategy not in WEIGHT_STRATEGIES:
            raise bad(f"weights.strategy={strategy!r}: supported are {', '.join(WEIGHT_STRATEGIES)}")
        gs = weights.get("group_size")
        if strategy == "group" and (not isinstance(gs, int) or gs <= 0):
            raise bad(f"weights.group_size={gs!r}: a group-wise scheme needs a positive group size")
        if weights.get("dynamic", False) is not False:
            raise bad("weights.dynamic must be false")
        if weights.get("actorder") not in (None, "static", "weight"):
            raise bad(
                f"weights.actorder={weights.get('actorder')!r}: 'group' act-order (a stored weight_g_idx) is not "
                f"supported"
            )
        if not isinstance(weights.get("symmetric", True), bool):
            raise bad("weights.symmetric must be true or false")
        inputs = group.get("input_activations")
        for why in stored_dtype_problems("weights", weights) + strategy_problems(weights, inputs):
            raise bad(why)
        if inputs is not None:
            if not isinstance(inputs, dict):
                raise bad("input_activations must be a mapping or null")
            if inputs.get("type") not in ("int", "float") or inputs.get("num_bits") != 8:
                raise bad("input_activations: 8-bit int or float only")
            if inputs.get("strategy") not in ACTIVATION_STRATEGIES:
                raise bad(
                    f"input_activations.strategy={inputs.get('strategy')!r}: supported are "
                    f"{', '.join(ACTIVATION_STRATEGIES)}"
                )
            if inputs.get("dynamic") not in (True, False):
                raise bad(f"input_activations.dynamic={inputs.get('dynamic')!r}: true or false")
            if inputs.get("strategy") == "token" and inputs.get("dynamic") is not True:
                raise bad("per-token input activations must be dynamic")
            if inputs.get("type") != kind:
                raise bad(
                    "input_activations.type must equal weights.type (W4AFP8-style mixes are not supported)"
                )
            for why in stored_dtype_problems("input_activations", inputs):
                raise bad(why)
        fmt = group.get("format")
        derived = infer_format(group)
        if fmt is None:
            group["format"] = derived
        elif fmt not in FORMATS:
            raise bad(f"format={fmt!r} is not one this plugin reads ({', '.join(FORMATS)})")
        elif fmt != derived and not (fmt == "naive-quantized" and derived != "pack-quantized"):
            raise bad(f"format={fmt!r} does not fit its scheme (compressed-tensors writes {derived!r})")
        return group

    # -- facts the quantizer asks ------------------------------------------------------------

    def static_activations(self) -> bool:
        """Whether some group quantizes inputs with stored (calibrated) scales."""
        return any(
            (g.get("input_activations") or {}).get("dynamic") is False
            for g in (self.config_groups or {}).values()
        )

    # -- serialization -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Exactly the keys compressed-tensors' ``ModelCompressor.update_config`` writes, then the
        keys another tool added to a checkpoint's config (``extra``, kept as they were)."""
        out = {
            "config_groups": copy.deepcopy(self.config_groups),
            "format": self.format,
            "global_compression_ratio": self.global_compression_ratio,
            "ignore": list(self.ignore or ()),
            "kv_cache_scheme": None,
            "moe_sparsity_config": None,
            "quant_method": self.quant_method,
            "quantization_status": self.quantization_status,
            "sparsity_config": {},
            "transform_config": {},
            "version": self.version,
        }
        out.update({k: copy.deepcopy(v) for k, v in self.extra.items() if k not in out})
        return out


def _library_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compressed-tensors")
    except PackageNotFoundError:
        return None
