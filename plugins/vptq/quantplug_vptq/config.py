"""``VptqConfig``: VPTQ's ``quantization_config`` as Transformers reads it (``VptqConfig`` /
``VptqLayerConfig`` in transformers.utils.quantization_config). Light: no torch.

A VPTQ checkpoint has one entry per quantized Linear in ``config_for_layers`` (vector lengths,
code book sizes, groups, outliers, norm and permutation switches); ``shared_layer_config`` holds
entries that several layers share. The entries are checked here for types and ranges; their fit
to each layer's shape is checked at load (``quantplug_vptq.quantizer``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import quantplug
from quantplug.matching import matching_pattern

#: keys every layer entry must have: Transformers' ``replace_with_vptq_linear`` reads them all
REQUIRED = (
    "vector_lens",
    "num_centroids",
    "num_res_centroids",
    "group_num",
    "group_size",
    "outlier_size",
    "enable_norm",
    "enable_perm",
)
#: keys an entry may have besides: VQuantLinear's other arguments (checked, or against the layer)
OPTIONAL = (
    "in_features",
    "out_features",
    "bias",
    "is_indice_packed",
    "indices_as_float",
    "vector_quant_dim",
    "enable_proxy_error",
    "debug",
)
PAIRS = ("vector_lens", "num_centroids", "num_res_centroids")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer's VPTQ settings, read from its ``config_for_layers`` entry."""

    vector_len: int
    num_centroids: int
    num_res_centroids: int  # 0: no residual code book
    group_num: int
    group_size: int
    outlier_size: int
    outlier_vector_len: int  # 0: no outliers
    outlier_num_centroids: int
    enable_norm: bool
    enable_perm: bool
    in_features: int  # -1: not given
    out_features: int
    bias: bool | None  # None: not given

    @property
    def index_bits(self) -> int:
        return self.num_centroids.bit_length() - 1

    @property
    def res_bits(self) -> int:
        return self.num_res_centroids.bit_length() - 1 if self.num_res_centroids else 0

    @property
    def outliers(self) -> bool:
        return self.outlier_vector_len > 0

    def width(self) -> int:
        """The input columns these settings describe: the groups, then the outlier columns."""
        return self.group_num * self.group_size + (self.outlier_size if self.outliers else 0)


def _power_of_two(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 2 and n & (n - 1) == 0


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _problem(entry: Any) -> tuple[str, str] | None:
    """(key, what is wrong) for a malformed layer entry, or None."""
    if not isinstance(entry, dict):
        return "", "must be an object of VPTQ layer settings"
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        return missing[0], f"is missing (an entry needs {', '.join(REQUIRED)})"
    unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        return unknown[0], f"is not a VPTQ layer setting (known: {', '.join(REQUIRED + OPTIONAL)})"
    for key in PAIRS:
        v = entry[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_int(x) for x in v)):
            return key, f"={v!r} must be [outlier value, value], two integers"
    for key, low in (("group_num", 1), ("group_size", 1), ("outlier_size", 0)):
        if not _int(entry[key]) or entry[key] < low:
            return key, f"={entry[key]!r} must be an integer >= {low}"
    for key in ("enable_norm", "enable_perm"):
        if not isinstance(entry[key], bool):
            return key, f"={entry[key]!r} must be true or false"
    return _value_problem(entry)


def _value_problem(entry: dict) -> tuple[str, str] | None:
    (olen, vlen), (onc, nc), (onr, nr) = (entry[k] for k in PAIRS)
    if vlen < 1:
        return "vector_lens", f"={entry['vector_lens']!r}: the vector length (second value) must be >= 1"
    if not _power_of_two(nc):
        return "num_centroids", f"={entry['num_centroids']!r}: the code book size must be a power of two >= 2"
    if nr > 0 and not _power_of_two(nr):
        return (
            "num_res_centroids",
            f"={entry['num_res_centroids']!r}: a residual code book size must be a power of two",
        )
    bits = (nc.bit_length() - 1) + (nr.bit_length() - 1 if nr > 0 else 0)
    if bits > 32:
        return "num_centroids", f"and num_res_centroids need {bits} index bits; VPTQ packs at most 32"
    if olen > 1 and onc > 0:  # VQuantLinear's outlier switch
        if onr != -1:
            return (
                "num_res_centroids",
                f"={entry['num_res_centroids']!r}: outliers have no residual (first value -1)",
            )
        if not 1 <= onc <= 65536:
            return (
                "num_centroids",
                f"={entry['num_centroids']!r}: outlier indices are 16-bit, at most 65536 centroids",
            )
        if entry["outlier_size"] < 1:
            return "outlier_size", "=0 with outliers on (vector_lens[0] > 1 and num_centroids[0] > 0)"
    if entry.get("is_indice_packed", True) is not True:
        return "is_indice_packed", "must be true: Transformers and VPTQ's releases store packed indices"
    for key, allowed in (("indices_as_float", (False, None)), ("enable_proxy_error", (False, None))):
        if entry.get(key) not in allowed:
            return key, f"={entry[key]!r} must be false (a fine-tuning / quantizing switch)"
    if entry.get("vector_quant_dim", "out") != "out":
        return "vector_quant_dim", f"={entry['vector_quant_dim']!r}: VPTQ implements only 'out'"
    for key in ("in_features", "out_features"):
        if not _int(entry.get(key, -1)):
            return key, f"={entry[key]!r} must be an integer"
    if entry.get("bias") not in (True, False, None):
        return "bias", f"={entry['bias']!r} must be true or false"
    return None


def spec_of(entry: dict) -> LayerSpec:
    """The ``LayerSpec`` of a validated entry."""
    (olen, vlen), (onc, nc), (_, nr) = (entry[k] for k in PAIRS)
    outliers = olen > 1 and onc > 0
    return LayerSpec(
        vector_len=vlen,
        num_centroids=nc,
        num_res_centroids=nr if nr > 0 else 0,
        group_num=entry["group_num"],
        group_size=entry["group_size"],
        outlier_size=entry["outlier_size"],
        outlier_vector_len=olen if outliers else 0,
        outlier_num_centroids=onc if outliers else 0,
        enable_norm=entry["enable_norm"],
        enable_perm=entry["enable_perm"],
        in_features=entry.get("in_features", -1),
        out_features=entry.get("out_features", -1),
        bias=entry.get("bias"),
    )


@dataclasses.dataclass(frozen=True)
class VptqConfig(quantplug.QuantConfig):
    """VPTQ (``quant_method: "vptq"``), load-only.

    config_for_layers    {module name: layer settings}: vector_lens, num_centroids, num_res_centroids
                         ([outlier value, value] each), group_num, group_size, outlier_size,
                         enable_norm, enable_perm; optionally in_features, out_features, bias,
                         is_indice_packed (true), indices_as_float (false)
    shared_layer_config  {pattern: layer settings} for layers config_for_layers does not list. A
                         pattern matches a run of whole dotted components of the name
                         (``down_proj``, ``mlp.down_proj``); Transformers looks up only the
                         second component (``layers`` for ``model.layers.0.mlp.down_proj``),
                         which that rule includes. Two patterns matching one layer are an error
    enable_proxy_error   must be false (a quantize-time statistic; Transformers refuses true too)
    modules_to_not_convert  as Transformers matches it (regex prefix or suffix) or by components
    """

    quant_method = "vptq"
    skip_rules: ClassVar[tuple[str, ...]] = ("components", "transformers")

    enable_proxy_error: bool = False
    config_for_layers: dict[str, Any] = dataclasses.field(default_factory=dict)
    shared_layer_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.enable_proxy_error:
            raise self.invalid(
                "enable_proxy_error",
                "false",
                "proxy error is computed while quantizing; checkpoints carry false",
            )
        for field in ("config_for_layers", "shared_layer_config"):
            for name, entry in getattr(self, field).items():
                problem = _problem(entry)
                if problem is not None:
                    key, what = problem
                    raise self.entry_error(field, name, key, what)

    def entry_error(self, field: str, name: str, key: str, what: str) -> quantplug.ConfigError:
        """A ``ConfigError`` for one entry of ``field`` (its key ``key``), naming the field and layer."""
        where = f"{field}[{name!r}]" + (f".{key}" if key else "")
        sep = "" if what.startswith("=") else " "
        return quantplug.ConfigError(
            f"VptqConfig: {where}{sep}{what}.",
            field=field,
            value=getattr(self, field).get(name),
            allowed="VPTQ layer settings (see VptqConfig's documentation)",
        )

    def __hash__(self) -> int:  # the two mappings are dicts; the kept keys (``extra``) are not part of ==
        fields = {k: v for k, v in self.to_dict().items() if k not in self.extra}
        return hash(json.dumps(fields, sort_keys=True, default=str))

    def layer_entry(self, name: str) -> tuple[str, str, dict] | None:
        """Where layer ``name``'s settings come from (the field, ``config_for_layers`` or
        ``shared_layer_config``, and its key) and the entry, or None when neither has one."""
        if name in self.config_for_layers:
            return "config_for_layers", name, self.config_for_layers[name]
        found = [p for p in self.shared_layer_config if matching_pattern(name, [p])]
        if len(found) > 1 and any(
            self.shared_layer_config[p] != self.shared_layer_config[found[0]] for p in found
        ):
            raise quantplug.ConfigError(
                f"VptqConfig: layer {name!r} is not in config_for_layers and shared_layer_config keys "
                f"{', '.join(map(repr, found))} all match it with different settings; list the layer in "
                f"config_for_layers or keep one of them.",
                field="shared_layer_config",
                value=found,
                allowed="at most one matching key per layer",
            )
        if found:
            return "shared_layer_config", found[0], self.shared_layer_config[found[0]]
        return None
