"""What a backend declares it can do: ``Capabilities`` (the whole backend) and ``Preset``s (each
concrete config it recommends, with the measured facts ``select`` ranks by). Plain data; no torch."""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping
from typing import Any

from .config import QuantConfig
from .errors import ConfigError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def str_tuple(value: Any) -> tuple:
    """A tuple of ``value``; a bare string is one item (``("torch")`` is a missing-comma slip, not
    ``('t', 'o', 'r', 'c', 'h')``)."""
    return (value,) if isinstance(value, str) else tuple(value)


def _plain(value: Any) -> Any:
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, types.MappingProxyType) else value


class _Copyable:
    """Pickling and ``copy.deepcopy`` of a frozen descriptor whose mappings are read-only proxies
    (which pickle refuses): the fields as plain values, rebuilt through ``__post_init__``. A model
    carrying its quantization info deep-copies and pickles like any other."""

    def __getstate__(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        self.__post_init__()


@dataclasses.dataclass(frozen=True)
class Capabilities(_Copyable):
    """What a backend can do, declared by its plugin. ``select`` reasons from these alone."""

    bits: tuple[int, ...]
    """Weight bit widths the backend supports."""
    devices: tuple[str, ...] = ("cpu",)
    """torch device types it runs on (``"cpu"``, ``"cuda"``, ``"mps"``, ...)."""
    needs_calibration: bool = False
    """True when quantizing needs calibration data."""
    trainable: bool = False
    """True when adapters (e.g. LoRA) can be trained on top of the quantized layers."""
    serializable: bool = True
    """True when quantized models save and load through quantplug checkpoints."""
    quantizes: bool = True
    """False for a backend that only loads checkpoints other tools wrote (its quantizer refuses to
    quantize, saying why): ``select`` and ``compare`` never propose it."""
    weight_dtypes: tuple[str, ...] = ()
    """Storage formats of the weights, e.g. ``("int8", "int4")``."""
    activation_dtypes: tuple[str, ...] = ()
    """Activation formats when activations are quantized too; empty means full precision."""
    native_experts: bool = False
    """True when the quantizer quantizes stacked MoE experts modules whole (``quantize_experts``,
    ``quantplug.experts_contract``); otherwise the core unfuses them into per-expert Linears."""
    max_rel_error: Mapping[int, float] = dataclasses.field(default_factory=dict)

    """Per bit width, the bound on relative output error ``||y_q - y|| / ||y||`` of one Linear layer
    with Gaussian weights and inputs. The conformance kit checks it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(self.bits))
        object.__setattr__(self, "devices", str_tuple(self.devices))
        object.__setattr__(self, "weight_dtypes", str_tuple(self.weight_dtypes))
        object.__setattr__(self, "activation_dtypes", str_tuple(self.activation_dtypes))
        object.__setattr__(self, "max_rel_error", types.MappingProxyType(dict(self.max_rel_error)))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["max_rel_error"] = {str(k): v for k, v in self.max_rel_error.items()}
        return d


WORKLOADS = ("decode", "prefill")
"""What ``Preset.speed`` figures are given for: ``decode`` = one new token per call with a KV cache
(memory-bound at batch 1), ``prefill`` = a long prompt in one call (compute-bound)."""


PRESET_DTYPES = ("float32", "bfloat16", "float16")
"""Model dtypes a preset may declare (``Preset.dtype``)."""


@dataclasses.dataclass(frozen=True)
class Preset(_Copyable):
    """A concrete config a plugin recommends, with the facts ``quantplug.select`` reasons from.

    ``select`` knows nothing about any backend: it ranks a plugin's presets by what is declared
    here (and falls back to ``Config.for_bits`` for each of ``Capabilities.bits`` when a backend
    declares none). Declare measured figures and say where they come from in ``note``. The
    conformance kit measures ``bits``, ``bits_per_weight`` and ``rel_error`` on the preset's own
    layer, ``nn.Linear(2048, 2048, bias=False)`` with N(0, 0.02) weights in the preset's ``dtype``
    (else float32), and fails a figure the layer contradicts (``quantplug.preset_check`` states the
    tolerances; ``quantplug.testing.measure_preset`` measures a preset the same way).
    """

    name: str
    """Short label, unique within the backend, e.g. ``"nf4"`` or ``"int4-g64"``."""
    config: Any
    """The config: a ``QuantConfig`` of the backend's class, or the dict of its fields
    (``quant_method`` may be left out)."""
    bits: int
    """Nominal weight bit width: the width of the integer codes (an ``IntegerGrid``'s ``bits``)."""
    bits_per_weight: float | None = None
    """Stored bits per quantized weight (what sizes are predicted from): 8 x the bytes of every tensor
    ``Quantizer.module_tensors`` returns for the layer (codes, scales, zero points, code books, index
    tensors), the bias left out, / its weights. ``None``: ``bits`` plus an assumed 0.5 for per-group
    metadata, and ``select`` says so."""
    devices: tuple[str, ...] = ()
    """Device types this preset runs on; empty = the backend's ``capabilities.devices``."""
    min_cuda_capability: tuple[int, int] | None = None
    """Lowest CUDA compute capability it needs (e.g. ``(8, 9)`` for float8 matmuls)."""
    needs_calibration: bool | None = None
    """``None`` = the backend's ``capabilities.needs_calibration``."""
    trainable: bool | None = None
    """``None`` = the backend's ``capabilities.trainable``."""
    rel_error: float | None = None
    """Typical relative output error ``||y_q - y|| / ||y||`` of one quantized Linear layer on Gaussian
    inputs (``y`` the dense layer's output), the quality estimate. ``None`` = ``max_rel_error[bits]``."""
    speed: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    """Measured throughput relative to the unquantized model on the same device (on CPU the float32
    model, on CUDA the bfloat16 one), per device type and workload: ``{"cuda": {"decode": 1.5,
    "prefill": 0.04}}`` means 1.5x faster at decode and 25x slower at prefill. Leave out what was
    not measured. ``select`` prefers figures ``quantplug bench-presets`` measured on the user's
    machine; a ``note`` saying ``"<device> speed measured on <machine>"`` is quoted in its reasons."""
    note: str = ""
    dtype: str | None = None
    """The model dtype the preset is built for and its ``speed`` was measured in, as torch names it
    (``"bfloat16"``): a backend whose fast kernels take 16-bit activations declares it, and
    ``compare`` converts the model to it before quantizing that candidate (``compare(dtype=...)``
    forces one dtype for every candidate instead). ``None``: the model's own dtype."""
    model_types: tuple[str, ...] = ()
    """Transformers model types (``config.model_type``) the preset applies to, for a format tied to
    one architecture (gpt-oss's MXFP4 experts): ``select`` rejects it for other models, and for a
    model whose type it cannot tell (a parameter count). Empty: any model."""
    servable_by: tuple[str, ...] = ()
    """Serving engines that read this preset's checkpoints as they are, without conversion, as
    lowercase names, e.g. ``("vllm", "sglang")``: the engine loads the folder ``quantplug.save``
    writes (vLLM's compressed-tensors, GPTQ or bitsandbytes loaders, for example).
    ``select(serve=...)`` keeps only the presets that declare the engine. Declare only what was
    checked with the engine; empty = none is claimed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", str_tuple(self.devices))
        object.__setattr__(self, "servable_by", str_tuple(self.servable_by))
        object.__setattr__(self, "model_types", str_tuple(self.model_types))
        if self.min_cuda_capability is not None:
            object.__setattr__(self, "min_cuda_capability", tuple(self.min_cuda_capability))
        if self.dtype is not None and self.dtype not in PRESET_DTYPES:
            raise ConfigError(
                f"preset {self.name!r}: dtype={self.dtype!r} is not one of {', '.join(PRESET_DTYPES)}",
                field="dtype",
                value=self.dtype,
                allowed=list(PRESET_DTYPES),
            )
        speed = {
            str(dev): types.MappingProxyType(dict(fig)) if isinstance(fig, Mapping) else fig
            for dev, fig in dict(self.speed).items()
        }
        object.__setattr__(self, "speed", types.MappingProxyType(speed))

    def is_trainable(self, capabilities: Capabilities) -> bool:
        """This preset's ``trainable``, or its backend's ``capabilities.trainable`` when it says none."""
        return capabilities.trainable if self.trainable is None else self.trainable

    def build(self, config_class: type[QuantConfig]) -> QuantConfig:
        """The preset's config as an instance of ``config_class`` (raises ``ConfigError``)."""
        if isinstance(self.config, QuantConfig):
            if not isinstance(self.config, config_class):
                raise ConfigError(
                    f"preset {self.name!r} holds a {type(self.config).__name__}, not a {config_class.__name__}",
                    field="config",
                )
            return self.config
        data = dict(self.config)
        data.setdefault("quant_method", config_class.quant_method)
        return config_class.from_dict(data)

    def problems(self, config_class: Any) -> list[str]:
        """What is wrong with this preset for a backend whose config class is ``config_class``
        (empty when valid)."""
        where = f"preset {self.name!r}"
        out = []
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            out.append(f"{where}: name must be a lowercase label like 'int4-g64'")
        if isinstance(config_class, type) and issubclass(config_class, QuantConfig):
            try:
                self.build(config_class)
            except ConfigError as exc:
                out.append(f"{where}: its config is invalid: {exc}")
        if not (isinstance(self.bits, int) and not isinstance(self.bits, bool) and 1 <= self.bits <= 32):
            out.append(f"{where}: bits must be an integer 1..32, got {self.bits!r}")
        bpw = self.bits_per_weight
        if bpw is not None and not (isinstance(bpw, (int, float)) and 0 < bpw <= 64):
            out.append(f"{where}: bits_per_weight must be a number in (0, 64], got {bpw!r}")
        if self.rel_error is not None and not (
            isinstance(self.rel_error, (int, float)) and self.rel_error >= 0
        ):
            out.append(f"{where}: rel_error must be a number >= 0, got {self.rel_error!r}")
        for dev, figures in self.speed.items():
            if not isinstance(figures, Mapping):
                out.append(f"{where}: speed[{dev!r}] must map workloads to numbers, got {figures!r}")
                continue
            for workload, value in figures.items():
                if workload not in WORKLOADS:
                    out.append(
                        f"{where}: speed[{dev!r}] has workload {workload!r}; use {' or '.join(WORKLOADS)}"
                    )
                elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                    out.append(
                        f"{where}: speed[{dev!r}][{workload!r}] must be a positive number, got {value!r}"
                    )
        cap = self.min_cuda_capability
        if cap is not None and not (len(cap) == 2 and all(isinstance(v, int) for v in cap)):
            out.append(f"{where}: min_cuda_capability must be (major, minor), got {cap!r}")
        for engine in self.servable_by:
            if not isinstance(engine, str) or not NAME_RE.match(engine):
                out.append(
                    f"{where}: servable_by entries must be lowercase engine names like 'vllm', got {engine!r}"
                )
        return out

    def to_dict(self, config_class: type[QuantConfig] | None = None) -> dict[str, Any]:
        config = self.config.to_dict() if isinstance(self.config, QuantConfig) else dict(self.config)
        return {
            "name": self.name,
            "config": config,
            "bits": self.bits,
            "bits_per_weight": self.bits_per_weight,
            "devices": list(self.devices),
            "min_cuda_capability": list(self.min_cuda_capability) if self.min_cuda_capability else None,
            "needs_calibration": self.needs_calibration,
            "trainable": self.trainable,
            "rel_error": self.rel_error,
            "speed": {dev: dict(fig) for dev, fig in self.speed.items()},
            "note": self.note,
            "servable_by": list(self.servable_by),
            "model_types": list(self.model_types),
        }
