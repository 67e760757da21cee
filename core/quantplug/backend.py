"""What a plugin declares: the ``Backend`` descriptor, its ``Capabilities``, and the ``Quantizer``
base class a backend implements.

A descriptor is plain data. The heavy quantizer class is named by a ``"module:Class"`` string and
imported only when a model is actually quantized or loaded, so listing backends, reading their
capabilities and validating configs never imports torch or a backend library.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .config import QuantConfig
from .errors import BackendUnavailableError, ConfigError, PluginError
from .versions import installed_version

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _str_tuple(value: Any) -> tuple:
    """A tuple of ``value``; a bare string is one item (``("torch")`` is a missing-comma slip, not
    ``('t', 'o', 'r', 'c', 'h')``)."""
    return (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class Capabilities:
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
    weight_dtypes: tuple[str, ...] = ()
    """Storage formats of the weights, e.g. ``("int8", "int4")``."""
    activation_dtypes: tuple[str, ...] = ()
    """Activation formats when activations are quantized too; empty means full precision."""
    max_rel_error: Mapping[int, float] = dataclasses.field(default_factory=dict)
    """Per bit width, the bound on relative output error ``||y_q - y|| / ||y||`` of one Linear layer
    with Gaussian weights and inputs. The conformance kit checks it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(self.bits))
        object.__setattr__(self, "devices", _str_tuple(self.devices))
        object.__setattr__(self, "weight_dtypes", _str_tuple(self.weight_dtypes))
        object.__setattr__(self, "activation_dtypes", _str_tuple(self.activation_dtypes))
        object.__setattr__(self, "max_rel_error", types.MappingProxyType(dict(self.max_rel_error)))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["max_rel_error"] = {str(k): v for k, v in self.max_rel_error.items()}
        return d


WORKLOADS = ("decode", "prefill")
"""What ``Preset.speed`` figures are given for: ``decode`` = one new token per call with a KV cache
(memory-bound at batch 1), ``prefill`` = a long prompt in one call (compute-bound)."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """A concrete config a plugin recommends, with the facts ``quantplug.select`` reasons from.

    ``select`` knows nothing about any backend: it ranks a plugin's presets by what is declared
    here (and falls back to ``Config.for_bits`` for each of ``Capabilities.bits`` when a backend
    declares none). Declare measured figures and say where they come from in ``note``.
    """

    name: str
    """Short label, unique within the backend, e.g. ``"nf4"`` or ``"int4-g64"``."""
    config: Any
    """The config: a ``QuantConfig`` of the backend's class, or the dict of its fields
    (``quant_method`` may be left out)."""
    bits: int
    """Nominal weight bit width."""
    bits_per_weight: float | None = None
    """Stored bits per quantized weight, scales and zero points included (what sizes are predicted
    from). ``None``: ``bits`` plus an assumed 0.5 for per-group metadata, and ``select`` says so."""
    devices: tuple[str, ...] = ()
    """Device types this preset runs on; empty = the backend's ``capabilities.devices``."""
    min_cuda_capability: tuple[int, int] | None = None
    """Lowest CUDA compute capability it needs (e.g. ``(8, 9)`` for float8 matmuls)."""
    needs_calibration: bool | None = None
    """``None`` = the backend's ``capabilities.needs_calibration``."""
    trainable: bool | None = None
    """``None`` = the backend's ``capabilities.trainable``."""
    rel_error: float | None = None
    """Typical relative output error of one quantized Linear layer (Gaussian weights and inputs,
    like ``Capabilities.max_rel_error``), the quality estimate. ``None`` = ``max_rel_error[bits]``."""
    speed: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    """Measured throughput relative to the unquantized 16-bit model on the same device, per device
    type and workload: ``{"cuda": {"decode": 1.5, "prefill": 0.04}}`` means 1.5x faster at decode
    and 25x slower at prefill. Leave out what was not measured."""
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", _str_tuple(self.devices))
        if self.min_cuda_capability is not None:
            object.__setattr__(self, "min_cuda_capability", tuple(self.min_cuda_capability))
        speed = {
            str(dev): types.MappingProxyType(dict(fig)) if isinstance(fig, Mapping) else fig
            for dev, fig in dict(self.speed).items()
        }
        object.__setattr__(self, "speed", types.MappingProxyType(speed))

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

    def problems(self, backend: Backend) -> list[str]:
        """What is wrong with this preset for ``backend`` (empty when valid)."""
        where = f"preset {self.name!r}"
        out = []
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            out.append(f"{where}: name must be a lowercase label like 'int4-g64'")
        if isinstance(backend.config, type) and issubclass(backend.config, QuantConfig):
            try:
                self.build(backend.config)
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
        }


def _skip_declaration_problems(config: type[QuantConfig]) -> list[str]:
    """What is wrong with a config class's ``skip_aliases`` / ``skip_rules`` declaration."""
    from .matching import RULES

    out = []
    fields = {f.name for f in dataclasses.fields(config)}
    for alias in _str_tuple(config.skip_aliases):
        if alias not in fields:
            out.append(f"{config.__name__}.skip_aliases names {alias!r}, which is not one of its fields")
    rules = _str_tuple(config.skip_rules)
    if not rules or any(r not in RULES for r in rules):
        out.append(f"{config.__name__}.skip_rules must be a non-empty subset of {RULES}, got {rules!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend, as a plugin registers it. ``plugin`` and ``plugin_version`` are filled in by
    quantplug from the distribution that registered it."""

    name: str
    """The ``quant_method`` this backend owns (Transformers' name where Transformers has the method)."""
    config: type[QuantConfig]
    """The config class (a light dataclass; importing it must not import torch or the library)."""
    quantizer: str
    """``"module:Class"`` of the ``Quantizer`` subclass, imported on first use."""
    capabilities: Capabilities
    requires: tuple[str, ...] = ()
    """Requirement strings of the backend library, e.g. ``("bitsandbytes>=0.45,<0.51",)``, checked
    at runtime from installed metadata (without importing the library)."""
    description: str = ""
    notes: str = ""
    """Anything a user must know, shown by ``list`` and ``doctor`` (e.g. "upstream is in maintenance mode")."""
    plugin: str = ""
    plugin_version: str = ""
    presets: tuple[Preset, ...] = ()
    """The configs the plugin recommends; ``select`` ranks them and ``compare`` measures them.
    Empty: ``select`` derives one per bit width from ``config.for_bits``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires", _str_tuple(self.requires))
        object.__setattr__(self, "presets", tuple(self.presets))

    def problems(self) -> list[str]:
        """What is wrong with this descriptor (empty when valid). Checked at registration."""
        out = []
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            out.append(
                f"name {self.name!r} must be a lowercase identifier like 'hqq' or 'compressed-tensors'"
            )
        if not (isinstance(self.config, type) and issubclass(self.config, QuantConfig)):
            out.append(f"config must be a QuantConfig subclass, got {self.config!r}")
        elif self.config.quant_method != self.name:
            out.append(
                f"config {self.config.__name__}.quant_method is {self.config.quant_method!r}, "
                f"but the backend is named {self.name!r}; they must be equal"
            )
        else:
            out.extend(_skip_declaration_problems(self.config))
        if not isinstance(self.quantizer, str) or not _TARGET_RE.match(self.quantizer):
            out.append(f"quantizer must be a 'module:Class' string, got {self.quantizer!r}")
        if not isinstance(self.capabilities, Capabilities):
            out.append(
                f"capabilities must be a quantplug.Capabilities, got {type(self.capabilities).__name__}"
            )
        elif not self.capabilities.bits or not all(
            isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 32 for b in self.capabilities.bits
        ):
            out.append(
                f"capabilities.bits must be a non-empty list of integers 1..32, got {self.capabilities.bits!r}"
            )
        names = set()
        for preset in self.presets:
            if not isinstance(preset, Preset):
                out.append(f"presets must be quantplug.Preset objects, got {type(preset).__name__}")
                continue
            if preset.name in names:
                out.append(f"preset name {preset.name!r} is used twice")
            names.add(preset.name)
            out.extend(preset.problems(self))
        from packaging.requirements import InvalidRequirement, Requirement

        for req in self.requires:
            try:
                Requirement(req)
            except (InvalidRequirement, TypeError) as exc:
                out.append(f"requires entry {req!r} is not a valid requirement: {exc}")
        return out

    @cached_property
    def status(self) -> BackendStatus:
        """Whether the backend's libraries are installed in a supported version (metadata only)."""
        return check_requirements(self)

    @property
    def available(self) -> bool:
        return self.status.available

    def ensure_available(self) -> None:
        """Raise ``BackendUnavailableError`` with the fix when the backend cannot run here."""
        st = self.status
        if not st.available:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {st.reason}. Fix: {st.fix}")

    def quantizer_class(self) -> type[Quantizer]:
        """Import and return the quantizer class (the first heavy import of this backend)."""
        self.ensure_available()
        module_name, _, attr = self.quantizer.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise BackendUnavailableError(
                f"backend {self.name!r}: importing its quantizer {self.quantizer!r} failed: "
                f"{type(exc).__name__}: {exc}. Fix: reinstall {self.plugin or 'the plugin'} and its "
                f"library ({', '.join(self.requires) or 'no library'}); run `quantplug doctor` for details."
            ) from exc
        if not (isinstance(obj, type) and issubclass(obj, Quantizer)):
            raise PluginError(
                f"backend {self.name!r}: {self.quantizer!r} is not a quantplug.Quantizer subclass; "
                f"report this to the maintainers of {self.plugin or 'the plugin'}."
            )
        return obj


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str = ""
    fix: str = ""
    library_versions: Mapping[str, str | None] = dataclasses.field(default_factory=dict)


def check_requirements(backend: Backend) -> BackendStatus:
    """Check ``backend.requires`` against installed distributions, without importing them."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    versions: dict[str, str | None] = {}
    problems, fixes = [], []
    for text in backend.requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        installed = installed_version(req.name)
        versions[req.name] = installed
        quoted = f"'{req.name}{req.specifier}'" if req.specifier else req.name
        if installed is None:
            problems.append(f"{req.name} is not installed")
            fixes.append(f"pip install {quoted}")
            continue
        try:
            ok = req.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append(
                f"{req.name} {installed} is installed, but {backend.plugin or backend.name} supports {req.specifier}"
            )
            fixes.append(f"pip install {quoted}")
    if problems:
        return BackendStatus(False, "; ".join(problems), " && ".join(fixes), versions)
    return BackendStatus(True, "", "", versions)


class Quantizer:
    """Quantizes single modules for one backend and one config; the core does everything else
    (the model walk, skipping, progress, checkpoints, the Transformers bridge).

    Subclasses implement ``quantize_module`` and ``empty_module``; the rest have defaults.
    Torch and the backend library may be imported at the top of the subclass's module: it is
    imported only on first use.
    """

    def __init__(self, backend: Backend, config: QuantConfig):
        self.backend = backend
        self.config = config

    def validate_environment(self, device: torch.device | str) -> None:
        """Raise ``BackendUnavailableError`` (saying why and what to do) if this config cannot run
        on ``device``. The default checks ``capabilities.devices``."""
        kind = str(device).split(":")[0]
        if kind not in self.backend.capabilities.devices:
            raise BackendUnavailableError(
                f"backend {self.backend.name!r} does not run on {kind!r}; it supports "
                f"{', '.join(self.backend.capabilities.devices)}. Pass device= one of those, or pick "
                f"another backend (`quantplug select`)."
            )

    def check_config(self) -> None:
        """Raise ``ConfigError`` for settings the backend library refuses. Called once, when the
        quantizer is made (the library is imported by then), before any layer is touched: the
        place for validation that needs the library (e.g. its own config parser), while cheap type
        and range checks stay in the config class, which must not import it. Default: nothing."""

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        """Return why ``module`` cannot be quantized by this config (it is then left in full
        precision and reported), or ``None`` to quantize it."""
        return None

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        """Return the quantized replacement of ``module`` (an ``nn.Linear`` on the target device)."""
        raise NotImplementedError

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        """Return the quantized module that ``quantize_module`` would produce for ``module``, with
        uninitialized tensors (meta tensors are fine): its ``state_dict()`` keys, shapes and
        dtypes are what a checkpoint must hold. ``module`` is an ``nn.Linear`` on the meta device."""
        raise NotImplementedError

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that represent ``qmodule`` in a checkpoint, keyed relative to the module.
        Plain tensors only (tensor subclasses must be flattened here)."""
        return dict(qmodule.state_dict())

    def expected_tensors(
        self, name: str, module: nn.Linear
    ) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]]:
        """Keys (relative to the module), shapes and dtypes a checkpoint must hold for ``module``
        (``None`` = not checked). The default reads them off ``empty_module``."""
        return {k: (tuple(t.shape), t.dtype) for k, t in self.empty_module(name, module).state_dict().items()}

    def checkpoint_metadata(self, modules: dict[str, nn.Module]) -> dict[str, str]:
        """Extra string entries for the header of every safetensors file ``save`` writes, given the
        quantized modules by name (e.g. the per-tensor descriptions Transformers' torchao loader
        reads). Keys must not clash with quantplug's own (``format``, ``quantplug_*``, ...)."""
        return {}

    def needs_calibration(self) -> bool:
        """True when quantizing with this config needs calibration data (``quantplug.quantize(...,
        calibration_data=)``); without it ``quantize`` raises ``ConfigError``, and data given to a
        config that needs none is refused too. The default is ``capabilities.needs_calibration``;
        backends where only some configs calibrate (e.g. static activation scales) override this."""
        return self.backend.capabilities.needs_calibration

    def calibrate(self, model: nn.Module, batches: list[Any]) -> None:
        """Fit what the config needs from data (activation scales, GPTQ/AWQ statistics, ...).
        Called by ``quantize`` under ``torch.no_grad()`` once every layer has been replaced by
        ``quantize_module``, only when ``needs_calibration()``. ``batches`` is a non-empty list of
        model inputs already on the target device: a tensor (call ``model(batch)``) or a dict of
        keyword arguments (``model(**batch)``). A quantizer may leave its layers unfinished in
        ``quantize_module`` and finish them here."""
        raise PluginError(
            f"backend {self.backend.name!r} declares that {type(self.config).__name__} needs calibration, "
            f"but its quantizer does not implement calibrate(); report this to the maintainers of "
            f"{self.backend.plugin or 'the plugin'}."
        )

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Rebuild a quantized module from its checkpoint tensors (keys relative to the module).
        The default builds ``empty_module`` and assigns the tensors to it."""
        qmodule = self.empty_module(name, module)
        qmodule.load_state_dict(tensors, strict=True, assign=True)
        return qmodule
