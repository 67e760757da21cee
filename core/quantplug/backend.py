"""The ``Backend`` descriptor a plugin registers, whether its libraries are installed, and the
``Quantizer`` base class its quantizer implements.

A descriptor is plain data. The heavy quantizer class is named by a ``"module:Class"`` string and
imported only when a model is actually quantized or loaded, so listing backends, reading their
capabilities and validating configs never imports torch or a backend library.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .capabilities import NAME_RE, Capabilities, Preset, str_tuple
from .config import QuantConfig
from .errors import BackendUnavailableError, PluginError
from .grid_contract import GridMethods
from .versions import installed_version

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _skip_declaration_problems(config: type[QuantConfig]) -> list[str]:
    """What is wrong with a config class's ``skip_aliases`` / ``skip_rules`` declaration."""
    from .matching import RULES

    out = []
    fields = {f.name for f in dataclasses.fields(config)}
    for alias in str_tuple(config.skip_aliases):
        if alias not in fields:
            out.append(f"{config.__name__}.skip_aliases names {alias!r}, which is not one of its fields")
    rules = str_tuple(config.skip_rules)
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
    transformers_format: bool = False
    """True when this backend's checkpoints are in Transformers' own format for ``name`` (its own
    integration loads them, as for bitsandbytes and torchao). False when the plugin has its own
    format: if Transformers implements a method of the same name, a plain ``from_pretrained`` of
    such a checkpoint is refused with a pointer to ``quantplug.load`` (``integrations.guard``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires", str_tuple(self.requires))
        object.__setattr__(self, "presets", tuple(self.presets))

    def problems(self) -> list[str]:
        """What is wrong with this descriptor (empty when valid). Checked at registration."""
        out = []
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
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
        if not isinstance(self.transformers_format, bool):
            out.append(f"transformers_format must be True or False, got {self.transformers_format!r}")
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
            out.extend(preset.problems(self.config))
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
    """Check ``backend.requires`` against installed distributions, without importing them. A fix
    never asks for a version quantplug's own requirements exclude: when the plugin's range and
    quantplug's cannot both hold, it says the plugin is incompatible instead of a breaking pip line."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    versions: dict[str, str | None] = {}
    problems, fixes = [], []
    who = backend.plugin or backend.name
    for text in backend.requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        installed = installed_version(req.name)
        versions[req.name] = installed
        if installed is not None:
            try:
                if req.specifier.contains(Version(installed), prereleases=True):
                    continue
            except InvalidVersion:
                pass
            problems.append(
                f"{req.name} {installed} is installed, but {who} supports {spec_text(req.specifier)}"
            )
        else:
            problems.append(f"{req.name} is not installed")
        fixes.append(_requirement_fix(who, req))
    if problems:
        return BackendStatus(False, "; ".join(problems), " && ".join(fixes), versions)
    return BackendStatus(True, "", "", versions)


_LOWER_FIRST = {"===": 0, "==": 0, "~=": 1, ">=": 1, ">": 1, "<=": 2, "<": 2, "!=": 3}


def spec_text(specifier: Any) -> str:
    """A ``SpecifierSet`` as a person writes it: lower bounds first (packaging's ``str`` may print
    ``<0.2,>=0.1``, which reads as a reversed range)."""
    return ",".join(
        str(s) for s in sorted(specifier, key=lambda s: (_LOWER_FIRST.get(s.operator, 4), s.version))
    )


def _core_specifier(dist: str) -> tuple[Any, str] | None:
    """quantplug's own requirement on ``dist`` (from its installed metadata, extras included) as
    (SpecifierSet, "quantplug X.Y"), or ``None`` when quantplug does not constrain it."""
    from importlib.metadata import PackageNotFoundError, metadata, requires

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    try:
        texts, meta = requires("quantplug") or [], metadata("quantplug")
    except PackageNotFoundError:
        return None
    extras = [""] + list(meta.get_all("Provides-Extra") or [])
    spec, via = SpecifierSet(), set()
    for text in texts:
        req = Requirement(text)
        if canonicalize_name(req.name) != canonicalize_name(dist) or not req.specifier:
            continue
        holds = [e for e in extras if req.marker is None or req.marker.evaluate({"extra": e})]
        if holds:
            spec &= req.specifier
            via.add("" if "" in holds else f"[{','.join(holds)}]")
    label = f"quantplug{''.join(sorted(via)) if '' not in via else ''} {meta['Version']}"
    return (spec, label) if spec else None


def _satisfiable(specifier: Any) -> bool:
    """Whether some version satisfies ``specifier``: tries each bound and a version just above it
    (a non-empty range of versions contains one of them)."""
    from packaging.version import InvalidVersion, Version

    candidates = [Version("0")]
    for s in specifier:
        try:
            v = Version(s.version.removesuffix(".*"))
        except InvalidVersion:
            continue
        candidates += [v, Version(f"{v.base_version}.0.0.0.0.1")]
    return any(specifier.contains(v, prereleases=True) for v in candidates)


def _requirement_fix(who: str, req: Any) -> str:
    """How to meet ``req`` without breaking quantplug's own requirement on the same distribution."""
    core = _core_specifier(req.name)
    wanted = req.specifier & core[0] if core else req.specifier
    if core and not _satisfiable(wanted):
        mine, theirs = f"{req.name}{spec_text(req.specifier)}", f"{req.name}{spec_text(core[0])}"
        return (
            f"{who} is incompatible with this quantplug: it needs {mine}, but {core[1]} requires {theirs}. "
            f"Upgrade {who} to a release that supports {theirs}, or replace it with another plugin "
            f"(`quantplug select`); do not pip install {mine}, which would break quantplug"
        )
    return f"pip install '{req.name}{spec_text(wanted)}'" if wanted else f"pip install {req.name}"


class Quantizer(GridMethods):
    """Quantizes single modules for one backend and one config; the core does everything else
    (the model walk, skipping, progress, checkpoints, the Transformers bridge).

    Subclasses implement ``quantize_module`` and ``empty_module``; the rest have defaults (MoE
    experts: ``quantplug.experts_contract``). Torch and the backend library may be imported at the
    top of the subclass's module: it is imported only on first use."""

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

    def model_attributes(self) -> dict[str, Any]:
        """Attributes set on the model once it is quantized or loaded, for the libraries that read
        them to recognise a quantized model the way Transformers marks one: PEFT picks its
        bitsandbytes LoRA layers and ``prepare_model_for_kbit_training`` from ``is_loaded_in_4bit``
        / ``is_loaded_in_8bit`` and ``quantization_method``. Default: none."""
        return {}

    def offload_refusal(self) -> str | None:
        """Why accelerate's hooks cannot offload this backend's layers, or ``None`` when they can.
        ``quantplug.load(..., device_map=)`` offloads a layer placed on ``"disk"`` (or in CPU memory
        while the model runs on an accelerator): its persistent parameters and buffers are written
        out, left on the meta device, and put back before each forward. That works when a layer's
        state is exactly those plain tensors and its forward reads them on every call; the
        conformance kit checks it (outputs equal to a resident load) for every backend returning
        ``None``, and checks the refusal otherwise. Default: not declared, so refused."""
        who = self.backend.plugin or f"backend {self.backend.name!r}"
        return f"{who} does not declare that accelerate can offload its layers (Quantizer.offload_refusal)"

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

    def explain_stored_layout(self, name: str, stored: dict[str, Any]) -> str | None:
        """Why layer ``name``'s stored tensors ({key: (shape, dtype)}) are not this format's, or None."""

    def checkpoint_metadata(self, modules: dict[str, nn.Module], stored: list[str]) -> dict[str, str]:
        """Extra string entries for every safetensors header ``save`` writes, given the quantized
        modules by name and the keys of every stored tensor (e.g. torchao's tensor descriptions).
        Keys must not clash with quantplug's own (``format``, ``quantplug_*``, ...)."""
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
        keyword arguments (``model(**batch)``): ``quantplug.run_batch(model, batch)`` runs either. A quantizer may leave its layers unfinished in
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
