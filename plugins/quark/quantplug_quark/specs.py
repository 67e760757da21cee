"""Quark's quantization specs (``QTensorConfig`` as exported in ``config.json``), checked against
what this plugin reads, and resolved per layer the way Quark resolves them. Light: no torch.

A spec is the dict Quark writes for ``weight`` / ``input_tensors`` / ``output_tensors`` / ``bias``
of a layer config (``global_quant_config``, ``layer_quant_config[pattern]``, ...). The schemes read
here are the ones Quark's exports use most:

- weights: ``fp8_e4m3`` per tensor / per output channel; ``int8`` / ``uint8`` per tensor / per output
  channel; ``int4`` / ``uint4`` per output channel or per group along the inputs (packed eight per
  int32 in ``export.pack_method`` order); ``fp4`` (e2m1, two per byte) with an e8m0 scale per 32
  inputs (MXFP4);
- activations (``input_tensors``) and outputs (``output_tensors``, Quark's KV-cache scales): static
  per-tensor ``fp8_e4m3``, ``int8`` or ``uint8``, and dynamic MXFP4 (``fp4`` per 32, e8m0 scales
  computed per call), fake-quantized on every forward as Quark does.

Anything else raises ``ConfigError`` naming the spec field (``global_quant_config.weight.dtype``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

from quantplug import ConfigError

#: the keys of a tensor spec Quark 0.13 exports (QTensorConfig.to_dict)
SPEC_KEYS = frozenset(
    {
        "dtype",
        "observer_cls",
        "is_dynamic",
        "qscheme",
        "ch_axis",
        "group_size",
        "symmetric",
        "round_method",
        "scale_type",
        "scale_format",
        "scale_calculation_mode",
        "mx_element_dtype",
        "zero_point_type",
        "is_scale_quant",
        "block_size",
        "enable_buffer_reuse",
        "max_input_numel",
    }
)
#: the keys of a layer config (QLayerConfig)
LAYER_KEYS = frozenset({"weight", "input_tensors", "output_tensors", "bias", "target_device"})

#: weight dtype -> the qschemes read for it
WEIGHT_SCHEMES = {
    "fp8_e4m3": ("per_tensor", "per_channel"),
    "int8": ("per_tensor", "per_channel"),
    "uint8": ("per_tensor", "per_channel"),
    "int4": ("per_channel", "per_group"),
    "uint4": ("per_channel", "per_group"),
    "fp4": ("per_group",),
}
#: activation / output dtypes read (static, per tensor)
ACTIVATION_DTYPES = ("fp8_e4m3", "int8", "uint8")
INT_DTYPES = ("int8", "uint8", "int4", "uint4")
BITS = {"fp8_e4m3": 8, "int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "fp4": 4}


def _err(path: str, value: Any, allowed: str, why: str = "") -> ConfigError:
    reason = f" ({why})" if why else ""
    return ConfigError(
        f"QuarkConfig: {path}={value!r} is not supported{reason}; allowed: {allowed}.",
        field=path,
        value=value,
        allowed=allowed,
    )


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checked spec: what the loader needs of it."""

    dtype: str
    qscheme: str
    ch_axis: int | None
    group_size: int | None
    symmetric: bool | None
    is_dynamic: bool = False
    scale_calculation_mode: str | None = None

    @property
    def is_int(self) -> bool:
        return self.dtype in INT_DTYPES


def check_spec(path: str, spec: Any, role: str) -> TensorSpec | None:
    """``spec`` (a layer config's ``role`` entry) as a ``TensorSpec``, ``None`` when not quantized;
    ``ConfigError`` naming ``path.<field>`` for what this plugin does not read."""
    if spec is None:
        return None
    if isinstance(spec, list):
        raise _err(path, f"a list of {len(spec)} specs", "one spec (an object)", "two-stage quantization")
    if not isinstance(spec, dict):
        raise _err(path, spec, "a spec object or null")
    unknown = sorted(set(spec) - SPEC_KEYS, key=str)
    if unknown:
        raise _err(f"{path}.{unknown[0]}", spec[unknown[0]], ", ".join(sorted(SPEC_KEYS)), "unknown spec key")
    if role == "bias":
        raise _err(path, spec, "null", "quantized biases are not read by quantplug-quark")
    dtype = spec.get("dtype")
    if spec.get("mx_element_dtype") is not None:
        raise _err(f"{path}.mx_element_dtype", spec["mx_element_dtype"], "null", "legacy 'mx' packing")
    if spec.get("is_scale_quant"):
        raise _err(f"{path}.is_scale_quant", True, "false", "quantized scales (two-stage)")
    if role == "weight":
        return _weight_spec(path, spec, dtype)
    return _activation_spec(path, spec, dtype)


def _weight_spec(path: str, spec: dict, dtype: Any) -> TensorSpec:
    if dtype not in WEIGHT_SCHEMES:
        raise _err(f"{path}.dtype", dtype, ", ".join(map(repr, WEIGHT_SCHEMES)))
    qscheme = spec.get("qscheme", "per_group" if dtype == "fp4" else None)
    if qscheme not in WEIGHT_SCHEMES[dtype]:
        raise _err(f"{path}.qscheme", qscheme, f"for dtype {dtype!r}: " + ", ".join(WEIGHT_SCHEMES[dtype]))
    if spec.get("is_dynamic"):
        raise _err(f"{path}.is_dynamic", True, "false", "weights are stored quantized")
    axis, group = spec.get("ch_axis"), spec.get("group_size")
    if qscheme == "per_channel" and axis != 0:
        raise _err(f"{path}.ch_axis", axis, "0 (one scale per output channel)")
    if qscheme == "per_group":
        if axis not in (-1, 1, None):
            raise _err(f"{path}.ch_axis", axis, "-1 or 1 (groups along the inputs)")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise _err(f"{path}.group_size", group, "a positive integer")
        if dtype == "fp4" and group != 32:
            raise _err(f"{path}.group_size", group, "32 (MXFP4)")
    fmt = spec.get("scale_format")
    if dtype == "fp4" and fmt != "e8m0":
        raise _err(f"{path}.scale_format", fmt, "'e8m0' for fp4 weights (MXFP4)")
    if dtype != "fp4" and fmt not in (None, "float"):
        raise _err(f"{path}.scale_format", fmt, "null or 'float'")
    _check_scale_and_zero(path, spec)
    if dtype == "fp8_e4m3" and spec.get("symmetric") is False:
        raise _err(f"{path}.symmetric", False, "true or null for fp8")
    return TensorSpec(dtype, qscheme, axis, group, spec.get("symmetric"))


def _activation_spec(path: str, spec: dict, dtype: Any) -> TensorSpec:
    if spec.get("is_dynamic"):
        return _dynamic_mxfp4_spec(path, spec, dtype)
    if dtype not in ACTIVATION_DTYPES:
        raise _err(f"{path}.dtype", dtype, ", ".join(map(repr, ACTIVATION_DTYPES)) + " (static)")
    qscheme = spec.get("qscheme")
    if qscheme != "per_tensor":
        raise _err(f"{path}.qscheme", qscheme, "'per_tensor' (one static scale)")
    if spec.get("scale_format") not in (None, "float"):
        raise _err(f"{path}.scale_format", spec["scale_format"], "null or 'float'")
    _check_scale_and_zero(path, spec)
    return TensorSpec(dtype, qscheme, spec.get("ch_axis"), spec.get("group_size"), spec.get("symmetric"))


def _dynamic_mxfp4_spec(path: str, spec: dict, dtype: Any) -> TensorSpec:
    """Dynamic activations: only MXFP4 (Quark's w_mxfp4_a_mxfp4), computed per call as Quark does."""
    if dtype != "fp4":
        raise _err(
            f"{path}.is_dynamic", True, "false, or dtype 'fp4' (MXFP4)", f"dynamic {dtype} activations"
        )
    checks = (
        ("qscheme", ("per_group",)),
        ("group_size", (32,)),
        ("ch_axis", (-1,)),
        ("scale_format", ("e8m0",)),
        ("scale_calculation_mode", (None, "even", "floor", "ceil")),
        ("scale_type", (None, "float", "float32")),
    )
    for key, allowed in checks:
        if spec.get(key) not in allowed:
            raise _err(
                f"{path}.{key}", spec.get(key), " or ".join(map(repr, allowed)), "dynamic MXFP4 activations"
            )
    _check_scale_and_zero(path, spec)
    return TensorSpec("fp4", "per_group", -1, 32, None, True, spec.get("scale_calculation_mode"))


#: scale types whose scales are stored as plain floats (pof2: powers of two, still floats)
FLOAT_SCALE_TYPES = (None, "float", "pof2", "float32", "float16", "bfloat16")


def _check_scale_and_zero(path: str, spec: dict) -> None:
    if spec.get("scale_type") not in FLOAT_SCALE_TYPES:
        allowed = ", ".join(repr(t) for t in FLOAT_SCALE_TYPES if t) + " or null"
        raise _err(f"{path}.scale_type", spec["scale_type"], allowed, "quantized scales are not read")
    if spec.get("zero_point_type") not in (None, "int32"):
        raise _err(f"{path}.zero_point_type", spec["zero_point_type"], "'int32' or null", "float zero points")


@dataclasses.dataclass(frozen=True)
class LayerScheme:
    """What one Linear layer stores and computes: its weight spec and the static activation /
    output specs (``None``: not quantized; a layer Quark excludes but whose KV-cache output it
    quantizes keeps a full-precision weight), and the int4 packing order."""

    weight: TensorSpec | None
    input: TensorSpec | None = None
    output: TensorSpec | None = None
    reorder: bool = True
    source: str = "global_quant_config"


def check_layer(path: str, layer: Any) -> dict[str, TensorSpec | None]:
    """A layer config's specs by role, checked (``path`` names it in errors)."""
    if layer is None:
        return {}
    if not isinstance(layer, dict):
        raise _err(path, layer, "a layer config object (weight, input_tensors, output_tensors, bias)")
    unknown = sorted(set(layer) - LAYER_KEYS, key=str)
    if unknown:
        raise _err(f"{path}.{unknown[0]}", layer[unknown[0]], ", ".join(sorted(LAYER_KEYS)), "unknown key")
    out = {role: check_spec(f"{path}.{role}", layer.get(role), role) for role in ("weight", "bias")}
    for role in ("input_tensors", "output_tensors"):
        out[role] = check_spec(f"{path}.{role}", layer.get(role), role)
    return out


def name_matches(name: str, pattern: str) -> bool:
    """Quark's module-name rule (``quant_config_parser.get_layer_quant_config``): ``fnmatch`` of the
    full module name (a name without wildcards matches itself only)."""
    return fnmatch.fnmatch(name, pattern)
