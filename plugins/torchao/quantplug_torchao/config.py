"""``TorchaoConfig``: torchao settings, stored exactly as Transformers' ``TorchAoConfig`` writes them.

Light: imports neither torch nor torchao. ``config.json`` holds

    {"quant_method": "torchao",
     "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {...}}},
     "modules_to_not_convert": null,
     "include_input_output_embeddings": false,
     "untie_embedding_weights": false}

where ``quant_type["default"]`` is torchao's own serialized config (``torchao.core.config.
config_to_dict``), so checkpoints written by Transformers load here and the other way round. The
quantizer rebuilds the torchao config object with ``torchao.core.config.config_from_dict``.

Build one with ``TorchaoConfig.from_mode("int8_weight_only")``, ``TorchaoConfig.from_mode(
"intx_weight_only", bits=4, group_size=32)`` or ``TorchaoConfig.for_bits(4)``; or pass the stored
form. Validation here checks what decides where a config can run and how it is stored (the torchao
config class and version, bit width, granularity, packing format); torchao checks the rest when
the quantizer builds its config object.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import quantplug

#: quantplug mode name -> torchao config class (torchao 0.18, config version 2)
MODES: dict[str, str] = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic_activation_int8_weight": "Int8DynamicActivationInt8WeightConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
    "intx_weight_only": "IntxWeightOnlyConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "float8_dynamic_activation_float8_weight": "Float8DynamicActivationFloat8WeightConfig",
}
_MODE_OF_TYPE = {v: k for k, v in MODES.items()}

#: torch device types each mode runs on, as measured with torchao 0.18 + torch 2.13 (CPU build) and
#: on an H200. Finer conditions (mslk, compute capability) are checked by the quantizer's
#: validate_environment and described in ``MODE_REQUIREMENTS``.
MODE_DEVICES: dict[str, tuple[str, ...]] = {
    "int8_weight_only": ("cpu", "cuda"),
    "int8_dynamic_activation_int8_weight": ("cpu", "cuda"),
    "int4_weight_only": ("cuda",),  # or any device torchao's mslk kernels support, when mslk is installed
    "intx_weight_only": ("cpu", "cuda"),
    "float8_weight_only": ("cpu", "cuda"),
    "float8_dynamic_activation_float8_weight": ("cuda",),
}
MODE_REQUIREMENTS: dict[str, str] = {
    "int4_weight_only": (
        "int4_packing_format 'tile_packed_to_4d' or 'plain_int32' needs a CUDA GPU; 'plain' or "
        "'preshuffled' needs the mslk package (pip install 'mslk>=1.0.0')"
    ),
    "float8_dynamic_activation_float8_weight": "a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer)",
}

#: weight bits per mode (intx: from weight_dtype)
_MODE_BITS = {
    "int8_weight_only": 8,
    "int8_dynamic_activation_int8_weight": 8,
    "int4_weight_only": 4,
    "float8_weight_only": 8,
    "float8_dynamic_activation_float8_weight": 8,
}

#: the ``_data`` keys torchao 0.18 writes for each config class (anything else is a typo or a
#: torchao version this plugin does not support)
_FIELDS: dict[str, frozenset[str]] = {
    "Int8WeightOnlyConfig": frozenset({"group_size", "granularity", "set_inductor_config"}),
    "Int8DynamicActivationInt8WeightConfig": frozenset(
        {"act_mapping_type", "weight_only_decode", "granularity", "set_inductor_config", "reduce_range"}
    ),
    "Int4WeightOnlyConfig": frozenset(
        {
            "group_size",
            "set_inductor_config",
            "int4_packing_format",
            "int4_choose_qparams_algorithm",
            "int4_tile_packed_ntile",
        }
    ),
    "IntxWeightOnlyConfig": frozenset(
        {
            "weight_dtype",
            "granularity",
            "mapping_type",
            "scale_dtype",
            "intx_packing_format",
            "intx_choose_qparams_algorithm",
        }
    ),
    "Float8WeightOnlyConfig": frozenset({"weight_dtype", "set_inductor_config", "granularity"}),
    "Float8DynamicActivationFloat8WeightConfig": frozenset(
        {
            "activation_dtype",
            "weight_dtype",
            "granularity",
            "packing_format",
            "mm_config",
            "activation_value_lb",
            "activation_value_ub",
            "kernel_preference",
            "set_inductor_config",
            "alg_id",
        }
    ),
}
INT4_PACKING_FORMATS = ("tile_packed_to_4d", "plain", "preshuffled", "plain_int32")
INT4_GROUP_SIZES = (32, 64, 128, 256)
INTX_BITS = (2, 3, 4, 5, 6, 7, 8)

# -- torchao's serialized form, written without importing torchao -------------------------------
# (tests/test_torchao.py checks each against torchao.core.config.config_to_dict)


def _obj(type_: str, data: Any, version: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"_type": type_}
    if version is not None:
        out["_version"] = version
    out["_data"] = data
    return out


def _dtype(name: str) -> dict[str, Any]:
    return _obj("torch.dtype", name)


def _per_row() -> dict[str, Any]:
    return _obj("PerRow", {"dim": -1}, 1)


def _per_tensor() -> dict[str, Any]:
    return _obj("PerTensor", {}, 1)


def torchao_config_dict(
    mode: str,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    int4_packing_format: str = "tile_packed_to_4d",
    float8_granularity: str = "tensor",
) -> dict[str, Any]:
    """The ``torchao.core.config.config_to_dict`` form of the torchao config for ``mode``.

    bits                 intx_weight_only: 2..8 (default 4); other modes: their fixed width or None
    group_size           intx_weight_only: weights per scale along the input (default 32; -1 = one per
                         output channel); int4_weight_only: 32, 64, 128 (default) or 256
    symmetric            intx_weight_only: False = a zero point per group
    int4_packing_format  int4_weight_only: 'tile_packed_to_4d' (default: CUDA, no extra package),
                         'plain' / 'preshuffled' (need mslk), 'plain_int32'
    float8_granularity   float8_dynamic_activation_float8_weight: 'tensor' (default) or 'row'
    """
    if mode not in MODES:
        raise quantplug.ConfigError(
            f"TorchaoConfig: mode={mode!r} is unknown; allowed: {', '.join(MODES)}.",
            field="mode",
            value=mode,
            allowed=list(MODES),
        )
    fixed = _MODE_BITS.get(mode)
    if fixed is not None and bits not in (None, fixed):
        raise quantplug.ConfigError(
            f"TorchaoConfig: bits={bits!r} is invalid for mode {mode!r}; it stores {fixed}-bit weights "
            f"(for other widths use mode 'intx_weight_only').",
            field="bits",
            value=bits,
            allowed=[fixed],
        )
    if mode not in ("intx_weight_only", "int4_weight_only") and group_size not in (None, -1):
        raise quantplug.ConfigError(
            f"TorchaoConfig: group_size={group_size!r} is invalid for mode {mode!r} (one scale per output "
            f"channel); group-wise modes: intx_weight_only, int4_weight_only.",
            field="group_size",
            value=group_size,
            allowed=[None, -1],
        )
    if mode == "int8_weight_only":
        return _obj(
            "Int8WeightOnlyConfig",
            {"group_size": None, "granularity": _per_row(), "set_inductor_config": True},
            2,
        )
    if mode == "int8_dynamic_activation_int8_weight":
        return _obj(
            "Int8DynamicActivationInt8WeightConfig",
            {
                "act_mapping_type": _obj("MappingType", "SYMMETRIC"),
                "weight_only_decode": False,
                "granularity": _per_row(),
                "set_inductor_config": True,
                "reduce_range": False,
            },
            2,
        )
    if mode == "int4_weight_only":
        g = 128 if group_size is None else group_size
        if g not in INT4_GROUP_SIZES:
            raise quantplug.ConfigError(
                f"TorchaoConfig: group_size={g!r} is invalid for int4_weight_only; allowed: {INT4_GROUP_SIZES}.",
                field="group_size",
                value=g,
                allowed=list(INT4_GROUP_SIZES),
            )
        if int4_packing_format not in INT4_PACKING_FORMATS:
            raise quantplug.ConfigError(
                f"TorchaoConfig: int4_packing_format={int4_packing_format!r} is invalid; allowed: "
                f"{', '.join(INT4_PACKING_FORMATS)}.",
                field="int4_packing_format",
                value=int4_packing_format,
                allowed=list(INT4_PACKING_FORMATS),
            )
        return _obj(
            "Int4WeightOnlyConfig",
            {
                "group_size": g,
                "set_inductor_config": True,
                "int4_packing_format": int4_packing_format,
                "int4_choose_qparams_algorithm": _obj("Int4ChooseQParamsAlgorithm", "TINYGEMM"),
                "int4_tile_packed_ntile": 8,
            },
            2,
        )
    if mode == "intx_weight_only":
        b = 4 if bits is None else bits
        if b not in INTX_BITS or isinstance(b, bool):
            raise quantplug.ConfigError(
                f"TorchaoConfig: bits={b!r} is invalid for intx_weight_only; allowed: {INTX_BITS}.",
                field="bits",
                value=b,
                allowed=list(INTX_BITS),
            )
        g = 32 if group_size is None else group_size
        if not isinstance(g, int) or isinstance(g, bool) or (g != -1 and g < 1):
            raise quantplug.ConfigError(
                f"TorchaoConfig: group_size={g!r} is invalid; allowed: -1 (per output channel) or a positive integer.",
                field="group_size",
                value=g,
                allowed="-1 or a positive integer",
            )
        gran = _obj("PerAxis", {"axis": 0}, 1) if g == -1 else _obj("PerGroup", {"group_size": g}, 1)
        return _obj(
            "IntxWeightOnlyConfig",
            {
                "weight_dtype": _dtype(f"int{b}"),
                "granularity": gran,
                "mapping_type": _obj("MappingType", "SYMMETRIC" if symmetric else "ASYMMETRIC"),
                "scale_dtype": None,
                "intx_packing_format": _obj("IntxPackingFormat", "UNPACKED_TO_INT8"),
                "intx_choose_qparams_algorithm": _obj("IntxChooseQParamsAlgorithm", "AFFINE"),
            },
            2,
        )
    if mode == "float8_weight_only":
        return _obj(
            "Float8WeightOnlyConfig",
            {"weight_dtype": _dtype("float8_e4m3fn"), "set_inductor_config": True, "granularity": _per_row()},
            2,
        )
    # float8_dynamic_activation_float8_weight
    if float8_granularity not in ("tensor", "row"):
        raise quantplug.ConfigError(
            f"TorchaoConfig: float8_granularity={float8_granularity!r} is invalid; allowed: 'tensor', 'row'.",
            field="float8_granularity",
            value=float8_granularity,
            allowed=["tensor", "row"],
        )
    gran = _per_tensor() if float8_granularity == "tensor" else _per_row()
    return _obj(
        "Float8DynamicActivationFloat8WeightConfig",
        {
            "activation_dtype": _dtype("float8_e4m3fn"),
            "weight_dtype": _dtype("float8_e4m3fn"),
            "granularity": [gran, dict(gran)],
            "packing_format": _obj("Float8PackingFormat", "PLAIN"),
            "mm_config": _obj(
                "Float8MMConfig", {"emulate": False, "use_fast_accum": True, "pad_inner_dim": False}, 1
            ),
            "activation_value_lb": None,
            "activation_value_ub": None,
            "kernel_preference": _obj("KernelPreference", "AUTO"),
            "set_inductor_config": True,
            "alg_id": 0,
        },
        2,
    )


# -- reading the serialized form ---------------------------------------------------------------


class _Bad(Exception):
    """A problem with quant_type: (what is allowed, why)."""


def _name(value: Any, default: str | None) -> str | None:
    """An enum / dtype value as its name: ``{"_type": ..., "_data": "NAME"}``, a bare string, or absent."""
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("_data"), str):
        return value["_data"]
    raise _Bad


def _granularity(value: Any) -> tuple[str, dict]:
    if (
        isinstance(value, dict)
        and isinstance(value.get("_type"), str)
        and isinstance(value.get("_data"), dict)
    ):
        return value["_type"], value["_data"]
    raise _Bad


def describe_quant_type(quant_type: Any) -> dict[str, Any]:
    """Read Transformers' ``quant_type`` field: ``{"mode", "torchao_type", "bits", "group_size",
    "int4_packing_format"}``. Raises ``ValueError(allowed, why)`` when it is not a supported config."""
    allowed = 'an object {"default": <torchao config_to_dict output, _version 2>} of one of ' + ", ".join(
        MODES.values()
    )
    if isinstance(quant_type, str):
        raise ValueError(
            allowed,
            "string quant types ('int8_weight_only', ...) are the pre-torchao-0.10 form whose checkpoints "
            "hold AffineQuantizedTensor pickles; re-quantize, or build one with TorchaoConfig.from_mode(...)",
        )
    if not isinstance(quant_type, dict) or set(quant_type) != {"default"}:
        raise ValueError(
            allowed,
            "it must have exactly one key, 'default' (per-module FqnToConfig is not supported by this plugin)",
        )
    inner = quant_type["default"]
    if not isinstance(inner, dict) or not isinstance(inner.get("_data"), dict) or "_type" not in inner:
        raise ValueError(allowed, "quant_type['default'] must be an object with '_type' and '_data'")
    type_ = inner["_type"]
    if not isinstance(type_, str) or type_ not in _MODE_OF_TYPE:
        raise ValueError(allowed, f"torchao config {type_!r} is not supported by quantplug-torchao")
    version = inner.get("_version", 1)
    if version != 2:
        raise ValueError(
            allowed,
            f"{type_} _version {version!r}: this plugin supports the version-2 configs of torchao 0.18 (version 1 "
            "stored AffineQuantizedTensor layouts); re-quantize with torchao 0.18",
        )
    data = inner["_data"]
    unknown = sorted(set(data) - _FIELDS[type_])
    if unknown:
        raise ValueError(
            allowed,
            f"{type_} has unknown field(s) {', '.join(unknown)} (torchao 0.18 knows {', '.join(sorted(_FIELDS[type_]))})",
        )
    mode = _MODE_OF_TYPE[type_]
    out: dict[str, Any] = {
        "mode": mode,
        "torchao_type": type_,
        "bits": _MODE_BITS.get(mode),
        "group_size": None,
        "int4_packing_format": None,
    }
    try:
        if type_ in (
            "Int8WeightOnlyConfig",
            "Int8DynamicActivationInt8WeightConfig",
            "Float8WeightOnlyConfig",
        ):
            if data.get("granularity") is not None and _granularity(data["granularity"])[0] != "PerRow":
                raise ValueError(
                    allowed, f"{type_}: granularity must be PerRow (one scale per output channel)"
                )
            if data.get("group_size") is not None:
                raise ValueError(allowed, f"{type_}: group_size must be null (version 2 is per-row only)")
            if type_ == "Float8WeightOnlyConfig" and _name(data.get("weight_dtype"), "float8_e4m3fn") != (
                "float8_e4m3fn"
            ):
                raise ValueError(allowed, "Float8WeightOnlyConfig: weight_dtype must be float8_e4m3fn")
        elif type_ == "Int4WeightOnlyConfig":
            g = data.get("group_size", 128)
            if g not in INT4_GROUP_SIZES or isinstance(g, bool):
                raise ValueError(
                    allowed, f"Int4WeightOnlyConfig: group_size {g!r} is not one of {INT4_GROUP_SIZES}"
                )
            fmt = (_name(data.get("int4_packing_format"), "plain") or "plain").lower()
            if fmt not in INT4_PACKING_FORMATS:
                raise ValueError(
                    allowed,
                    f"Int4WeightOnlyConfig: int4_packing_format {fmt!r} is not one of {INT4_PACKING_FORMATS}",
                )
            out.update(group_size=g, int4_packing_format=fmt)
        elif type_ == "IntxWeightOnlyConfig":
            dt = _name(data.get("weight_dtype"), "int8")
            bits = int(dt[3:]) if dt.startswith("int") and dt[3:].isdigit() else None
            if bits not in INTX_BITS:
                raise ValueError(
                    allowed, f"IntxWeightOnlyConfig: weight_dtype {dt!r} is not one of int2 .. int8"
                )
            gtype, gdata = (
                _granularity(data["granularity"])
                if data.get("granularity") is not None
                else ("PerAxis", {"axis": 0})
            )
            if gtype == "PerGroup":
                g = gdata.get("group_size")
                if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                    raise ValueError(
                        allowed, f"IntxWeightOnlyConfig: PerGroup group_size {g!r} must be a positive integer"
                    )
            elif gtype == "PerAxis" and gdata.get("axis", 0) == 0:
                g = -1
            else:
                raise ValueError(
                    allowed,
                    f"IntxWeightOnlyConfig: granularity {gtype} {gdata} must be PerGroup or PerAxis(axis=0)",
                )
            fmt = _name(data.get("intx_packing_format"), "UNPACKED_TO_INT8")
            if fmt.upper() != "UNPACKED_TO_INT8":
                raise ValueError(
                    allowed,
                    f"IntxWeightOnlyConfig: intx_packing_format {fmt!r} needs torchao's C++ CPU kernels, which "
                    "the published torchao wheel does not ship; use UNPACKED_TO_INT8",
                )
            mapping = _name(data.get("mapping_type"), "SYMMETRIC")
            if mapping not in ("SYMMETRIC", "ASYMMETRIC", "SYMMETRIC_NO_CLIPPING_ERR"):
                raise ValueError(allowed, f"IntxWeightOnlyConfig: mapping_type {mapping!r} is unknown")
            out.update(bits=bits, group_size=g)
    except _Bad:
        raise ValueError(allowed, f"{type_}: a field is not in torchao's serialized form") from None
    return out


@dataclasses.dataclass(frozen=True)
class TorchaoConfig(quantplug.QuantConfig):
    """torchao quantization, in Transformers' ``TorchAoConfig`` form (see the module docstring).

    quant_type                       {"default": torchao's serialized config}; build it with
                                     ``TorchaoConfig.from_mode(...)`` or ``for_bits(...)``
    modules_to_not_convert           None = keep the output head (and tied layers) in full precision
    include_input_output_embeddings  must be False: quantplug quantizes Linear layers only
    untie_embedding_weights          accepted for compatibility; only meaningful with embeddings
    quant_type_kwargs                accepted for Transformers 4.x configs; must be empty
    """

    quant_method = "torchao"

    quant_type: dict[str, Any] | str = dataclasses.field(
        default_factory=lambda: {"default": torchao_config_dict("int8_weight_only")}
    )
    include_input_output_embeddings: bool = False
    untie_embedding_weights: bool = False
    quant_type_kwargs: dict[str, Any] | None = None

    def validate(self) -> None:
        try:
            # a private deep copy in plain JSON types: the config stays immutable in practice
            object.__setattr__(self, "quant_type", json.loads(json.dumps(self.quant_type)))
        except (TypeError, ValueError):
            raise self.invalid("quant_type", "a JSON object", "it holds values JSON cannot store") from None
        try:
            info = describe_quant_type(self.quant_type)
        except ValueError as exc:
            allowed, why = exc.args
            raise self.invalid("quant_type", allowed, why) from None
        object.__setattr__(self, "_info", info)
        if self.include_input_output_embeddings:
            raise self.invalid(
                "include_input_output_embeddings",
                "false",
                "quantplug quantizes Linear layers only; to quantize the output head set "
                "modules_to_not_convert=[] (embeddings stay in full precision)",
            )
        if self.quant_type_kwargs == {}:
            object.__setattr__(self, "quant_type_kwargs", None)  # Transformers 4.x wrote {}: same meaning
        if self.quant_type_kwargs:
            raise self.invalid(
                "quant_type_kwargs",
                "null or {}",
                "it only applied to the removed string quant types; put settings in quant_type",
            )

    def __hash__(self) -> int:  # quant_type is a dict: hash the serialized form
        return hash(self.to_json(indent=None))

    # -- derived, read-only -------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The quantplug mode name (a key of ``MODES``)."""
        return self._info["mode"]

    @property
    def torchao_type(self) -> str:
        """The torchao config class name, e.g. ``"Int8WeightOnlyConfig"``."""
        return self._info["torchao_type"]

    @property
    def weight_bits(self) -> int:
        return self._info["bits"]

    @property
    def group_size(self) -> int | None:
        """Weights per scale along the input dimension; -1 = per output channel; None = per row."""
        return self._info["group_size"]

    @property
    def int4_packing_format(self) -> str | None:
        return self._info["int4_packing_format"]

    @property
    def devices(self) -> tuple[str, ...]:
        """torch device types this config's mode runs on (see ``MODE_REQUIREMENTS`` for conditions)."""
        if self.mode == "int4_weight_only" and self.int4_packing_format in ("plain", "preshuffled"):
            return ("cpu", "cuda")  # wherever mslk runs; checked at validate_environment
        return MODE_DEVICES[self.mode]

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_mode(
        cls,
        mode: str,
        *,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool = True,
        int4_packing_format: str = "tile_packed_to_4d",
        float8_granularity: str = "tensor",
        **fields: Any,
    ) -> TorchaoConfig:
        """A config for ``mode`` (a key of ``MODES``); ``fields`` are the other config fields
        (``modules_to_not_convert``, ...). See ``torchao_config_dict`` for the mode settings."""
        qt = torchao_config_dict(
            mode,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            int4_packing_format=int4_packing_format,
            float8_granularity=float8_granularity,
        )
        return cls(quant_type={"default": qt}, **fields)

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> TorchaoConfig:
        """8: int8 weight-only (per output channel). 2..7: intx weight-only, groups of 32,
        symmetric from 4 bits up and asymmetric below (a zero point matters most at 2-3 bits).
        Every one of these runs on CPU and CUDA; for CUDA's int4 kernels use
        ``from_mode("int4_weight_only")``. ``overrides``: ``group_size``, ``symmetric`` or config fields."""
        if bits == 8 and not isinstance(bits, bool):
            return cls.from_mode("int8_weight_only", **overrides)
        if bits in INTX_BITS and not isinstance(bits, bool):
            overrides.setdefault("group_size", 32)
            overrides.setdefault("symmetric", bits >= 4)
            return cls.from_mode("intx_weight_only", bits=bits, **overrides)
        raise quantplug.ConfigError(
            f"TorchaoConfig: bits={bits!r} is invalid; allowed: {', '.join(map(str, INTX_BITS))}.",
            field="bits",
            value=bits,
            allowed=list(INTX_BITS),
        )

    def to_transformers(self):
        """This config as Transformers' own ``TorchAoConfig`` (imports Transformers and torchao), for
        ``from_pretrained(..., quantization_config=...)``: Transformers keeps its own torchao path."""
        from transformers import TorchAoConfig as HfTorchAoConfig

        return HfTorchAoConfig.from_dict(self.to_dict())

    # -- serialization: exactly Transformers' keys -----------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("quant_type_kwargs") is None:
            out.pop("quant_type_kwargs", None)  # Transformers 5 does not write it
        return out
