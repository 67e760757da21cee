"""``TorchaoConfig``: torchao settings, stored exactly as Transformers' ``TorchAoConfig`` writes them.

Light: imports neither torch nor torchao. ``config.json`` holds

    {"quant_method": "torchao",
     "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {...}}},
     "modules_to_not_convert": null,
     "include_input_output_embeddings": false,
     "untie_embedding_weights": false}

where ``quant_type["default"]`` is torchao's own serialized config (``torchao.core.config.
config_to_dict``), so checkpoints written by Transformers load here and the other way round.

Build one with ``TorchaoConfig.from_mode("int8_weight_only")``, ``TorchaoConfig.from_mode(
"intx_weight_only", bits=4, group_size=32)`` or ``TorchaoConfig.for_bits(4)``; or pass the stored
form. The config checks the form (one ``default`` torchao config of a supported class, version 2);
the quantizer (``AutoQuantizer.from_config``, before any layer changes) parses ``_data`` with
torchao's ``config_from_dict`` and refuses what torchao refuses or this plugin does not run.
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
INT4_PACKING_FORMATS = ("tile_packed_to_4d", "plain", "preshuffled", "plain_int32")
INT4_GROUP_SIZES = (32, 64, 128, 256)
INTX_BITS = (2, 3, 4, 5, 6, 7, 8)

# -- torchao's serialized form, written without importing torchao -------------------------------
# (tests/test_torchao.py checks each against torchao.core.config.config_to_dict)


def _enum(type_: str, name: str) -> dict[str, Any]:
    return {"_type": type_, "_data": name}


def _obj(type_: str, data: dict[str, Any], version: int = 1) -> dict[str, Any]:
    return {"_type": type_, "_version": version, "_data": data}


_ROW, _F8 = _obj("PerRow", {"dim": -1}), _enum("torch.dtype", "float8_e4m3fn")
_FIXED_MODES: dict[str, dict[str, Any]] = {  # the _data of the modes without settings of their own
    "int8_weight_only": {"group_size": None, "granularity": _ROW, "set_inductor_config": True},
    "int8_dynamic_activation_int8_weight": {
        "act_mapping_type": _enum("MappingType", "SYMMETRIC"),
        "weight_only_decode": False,
        "granularity": _ROW,
        "set_inductor_config": True,
        "reduce_range": False,
    },
    "float8_weight_only": {"weight_dtype": _F8, "set_inductor_config": True, "granularity": _ROW},
    "float8_dynamic_activation_float8_weight": {
        "activation_dtype": _F8,
        "weight_dtype": _F8,
        "granularity": None,  # [per-tensor or per-row] * 2: from float8_granularity
        "packing_format": _enum("Float8PackingFormat", "PLAIN"),
        "mm_config": _obj(
            "Float8MMConfig", {"emulate": False, "use_fast_accum": True, "pad_inner_dim": False}
        ),
        "activation_value_lb": None,
        "activation_value_ub": None,
        "kernel_preference": _enum("KernelPreference", "AUTO"),
        "set_inductor_config": True,
        "alg_id": 0,
    },
}


def _require(field: str, value: Any, ok: bool, allowed: Any, where: str = "") -> None:
    if not ok:
        raise quantplug.ConfigError(
            f"TorchaoConfig: {field}={value!r} is invalid{where}; allowed: {allowed}.",
            field=field,
            value=value,
            allowed=allowed,
        )


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
    _require("mode", mode, mode in MODES, ", ".join(MODES), " (unknown)")
    if mode == "intx_weight_only":
        bits, g = 4 if bits is None else bits, 32 if group_size is None else group_size
        _require("bits", bits, type(bits) is int and bits in INTX_BITS, INTX_BITS, f" for {mode}")
        _require(
            "group_size",
            g,
            type(g) is int and (g == -1 or g >= 1),
            "-1 (per output channel) or a positive integer",
        )
        data = {
            "weight_dtype": _enum("torch.dtype", f"int{bits}"),
            "granularity": _obj("PerAxis", {"axis": 0}) if g == -1 else _obj("PerGroup", {"group_size": g}),
            "mapping_type": _enum("MappingType", "SYMMETRIC" if symmetric else "ASYMMETRIC"),
            "scale_dtype": None,
            "intx_packing_format": _enum("IntxPackingFormat", "UNPACKED_TO_INT8"),
            "intx_choose_qparams_algorithm": _enum("IntxChooseQParamsAlgorithm", "AFFINE"),
        }
        return _obj(MODES[mode], data, 2)
    fixed = 4 if mode == "int4_weight_only" else 8
    why = f" for mode {mode!r}; it stores {fixed}-bit weights (for other widths use mode 'intx_weight_only')"
    _require("bits", bits, bits in (None, fixed), fixed, why)
    if mode == "int4_weight_only":
        g = 128 if group_size is None else group_size
        _require("group_size", g, g in INT4_GROUP_SIZES, INT4_GROUP_SIZES, f" for {mode}")
        fmt = int4_packing_format
        _require("int4_packing_format", fmt, fmt in INT4_PACKING_FORMATS, ", ".join(INT4_PACKING_FORMATS))
        data = {
            "group_size": g,
            "set_inductor_config": True,
            "int4_packing_format": fmt,
            "int4_choose_qparams_algorithm": _enum("Int4ChooseQParamsAlgorithm", "TINYGEMM"),
            "int4_tile_packed_ntile": 8,
        }
        return _obj(MODES[mode], data, 2)
    why = f" for mode {mode!r} (one scale per output channel); group-wise modes: intx_weight_only, int4_weight_only"
    _require("group_size", group_size, group_size in (None, -1), [None, -1], why)
    data = dict(_FIXED_MODES[mode])
    if mode == "float8_dynamic_activation_float8_weight":
        fg = float8_granularity
        _require("float8_granularity", fg, fg in ("tensor", "row"), "'tensor', 'row'")
        data["granularity"] = [_obj("PerTensor", {}) if fg == "tensor" else _ROW] * 2
    return _obj(MODES[mode], json.loads(json.dumps(data)), 2)  # a fresh copy


def _name(value: Any, default: str) -> str:
    """An enum or dtype in torchao's serialized form (``{"_type", "_data": NAME}``, a bare string, or
    absent = ``default``) as its name."""
    value = default if value is None else value
    return str(value.get("_data") if isinstance(value, dict) else value)


def _form_problem(quant_type: Any) -> str | None:
    """Why ``quant_type`` is not one supported torchao config in its serialized form (None: it is)."""
    if isinstance(quant_type, str):
        return (
            "string quant types ('int8_weight_only', ...) are the pre-torchao-0.10 form whose checkpoints "
            "hold AffineQuantizedTensor pickles; re-quantize, or build one with TorchaoConfig.from_mode(...)"
        )
    if not isinstance(quant_type, dict) or set(quant_type) != {"default"}:
        return (
            "it must have exactly one key, 'default' (per-module FqnToConfig is not supported by this plugin)"
        )
    inner = quant_type["default"]
    if not (
        isinstance(inner, dict)
        and isinstance(inner.get("_type"), str)
        and isinstance(inner.get("_data"), dict)
    ):
        return "quant_type['default'] must be an object with '_type' (a string) and '_data' (an object)"
    if inner["_type"] not in _MODE_OF_TYPE:
        return f"torchao config {inner['_type']!r} is not supported by quantplug-torchao"
    version = inner.get("_version", 1)
    if version != 2:
        return (
            f"{inner['_type']} _version {version!r}: this plugin supports the version-2 configs of torchao 0.18 "
            "(version 1 stored AffineQuantizedTensor layouts); re-quantize with torchao 0.18"
        )
    return None


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
        try:  # a private deep copy in plain JSON types: the config stays immutable in practice
            copy = json.loads(json.dumps(self.quant_type, allow_nan=False))
        except (TypeError, ValueError):
            raise self.invalid(
                "quant_type", "a JSON object", "it holds values JSON cannot store: NaN, infinity, ..."
            ) from None
        object.__setattr__(self, "quant_type", copy)
        why = _form_problem(copy)
        if why:
            allowed = 'an object {"default": <torchao config_to_dict output, _version 2>} of one of '
            raise self.invalid("quant_type", allowed + ", ".join(MODES.values()), why)
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

    # -- derived, read-only (the _data ones as stored; torchao checks them in the quantizer) ------

    @property
    def torchao_type(self) -> str:
        """The torchao config class name, e.g. ``"Int8WeightOnlyConfig"``."""
        return self.quant_type["default"]["_type"]

    @property
    def mode(self) -> str:
        """The quantplug mode name (a key of ``MODES``)."""
        return _MODE_OF_TYPE[self.torchao_type]

    @property
    def weight_bits(self) -> int:
        if self.mode != "intx_weight_only":
            return 4 if self.mode == "int4_weight_only" else 8
        return int(_name(self.quant_type["default"]["_data"].get("weight_dtype"), "int8")[3:])

    @property
    def group_size(self) -> int | None:
        """Weights per scale along the input dimension; -1 = per output channel; None = per row."""
        data = self.quant_type["default"]["_data"]
        if self.mode == "int4_weight_only":
            return data.get("group_size", 128)
        if self.mode != "intx_weight_only":
            return None
        gran = data.get("granularity") or {}
        return gran["_data"].get("group_size") if gran.get("_type") == "PerGroup" else -1

    @property
    def int4_packing_format(self) -> str | None:
        if self.mode != "int4_weight_only":
            return None
        return _name(self.quant_type["default"]["_data"].get("int4_packing_format"), "plain").lower()

    @property
    def devices(self) -> tuple[str, ...]:
        """torch device types this config's mode runs on (see ``MODE_REQUIREMENTS`` for conditions)."""
        if self.int4_packing_format in ("plain", "preshuffled"):
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
        settings = dict(symmetric=symmetric, int4_packing_format=int4_packing_format)
        qt = torchao_config_dict(
            mode, bits=bits, group_size=group_size, float8_granularity=float8_granularity, **settings
        )
        return cls(quant_type={"default": qt}, **fields)

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> TorchaoConfig:
        """8: int8 weight-only (per output channel). 2..7: intx weight-only, groups of 32,
        symmetric from 4 bits up and asymmetric below (a zero point matters most at 2-3 bits).
        Every one of these runs on CPU and CUDA; for CUDA's int4 kernels use
        ``from_mode("int4_weight_only")``. ``overrides``: ``group_size``, ``symmetric`` or config fields."""
        ok = not isinstance(bits, bool) and (bits == 8 or type(bits) is int and bits in INTX_BITS)
        _require("bits", bits, ok, ", ".join(map(str, INTX_BITS)))
        if bits == 8:
            return cls.from_mode("int8_weight_only", **overrides)
        overrides.setdefault("group_size", 32)
        overrides.setdefault("symmetric", bits >= 4)
        return cls.from_mode("intx_weight_only", bits=bits, **overrides)

    def to_transformers(self):
        """This config as Transformers' own ``TorchAoConfig`` (imports Transformers and torchao), for
        ``from_pretrained(..., quantization_config=...)``: Transformers keeps its own torchao path."""
        from transformers import TorchAoConfig as HfTorchAoConfig

        return HfTorchAoConfig.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Exactly Transformers' keys: ``quant_type_kwargs`` is left out when null (Transformers 5
        does not write it)."""
        out = super().to_dict()
        if out.get("quant_type_kwargs") is None:
            out.pop("quant_type_kwargs", None)
        return out
