"""``select``'s first step, the filter: which of the registered backends' presets may run for this
model on this device within this budget, and for every other one, why not.

Only declarations are read (``Capabilities`` and ``Preset``s); no backend library is imported. A
backend that is not registered is not mentioned: first- and third-party plugins are alike here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .backend import Backend
from .candidates import presets_of
from .capabilities import Preset
from .config import QuantConfig
from .descriptor_cache import preset_config
from .errors import ConfigError
from .hardware import Hardware
from .lazy import LazyField
from .model_size import ModelSize
from .sizes import fmt_bytes

#: Bits per weight assumed for a preset that does not declare ``bits_per_weight``: ``bits`` plus
#: one 16-bit scale and one 16-bit zero point per group of 64 weights.
ASSUMED_GROUP_OVERHEAD_BITS = 0.5

#: Serving engines ``select(serve=...)`` accepts even when no installed preset declares them (it
#: then says none does); any name an installed preset declares in ``servable_by`` is accepted too.
KNOWN_ENGINES = ("vllm", "sglang", "tgi")


@dataclasses.dataclass
class Rejection:
    backend: str
    preset: str | None
    reason: str
    fix: str = ""
    predicted_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Request:
    """What the presets are filtered against."""

    size: ModelSize
    hardware: Hardware
    budget: int | None
    finetune: bool
    calibration_data: bool
    serve: str | None = None
    """A serving engine that must read the checkpoints as they are (``Preset.servable_by``)."""

    @property
    def pre_method(self) -> str | None:
        """The method of a pre-quantized checkpoint (only its backend qualifies), else None."""
        pre = self.size.pre_quantized
        return pre.get("quant_method") if isinstance(pre, Mapping) else None


@dataclasses.dataclass
class Eligible:
    """A preset that passed every rule, with what scoring and explaining it need."""

    backend: Backend
    preset: Preset
    config: QuantConfig
    bits_per_weight: float
    predicted_bytes: int
    fits: bool | None
    needs_calibration: bool


# A backend read from the descriptor cache gets its preset's config built on first read, so ranking
# does not import the plugin's module (``quantplug.descriptor_cache``).
Eligible.config = LazyField("config")  # type: ignore[assignment]


def eligible(request: Request) -> tuple[list[Eligible], list[Rejection], list[str]]:
    """The registered presets that may run, the rejected ones with reasons, and notes (a
    pre-quantized checkpoint; a compute capability that could not be checked)."""
    from . import backends

    passed: list[Eligible] = []
    rejected: list[Rejection] = []
    notes: list[str] = []
    if request.pre_method is not None:
        notes.append(
            f"the checkpoint is already quantized with {request.pre_method!r}: its method decides; load it "
            f"with quantplug.load (re-quantizing needs the full-precision weights)"
        )
    serving = servable_presets(request.serve) if request.serve is not None else []
    for backend in backends():
        presets = _presets(backend, request)
        if isinstance(presets, Rejection):
            rejected.append(presets)
            continue
        for preset in presets:
            verdict = _check(backend, preset, request, notes, serving)
            (rejected if isinstance(verdict, Rejection) else passed).append(verdict)
    return passed, rejected, notes


def _presets(backend: Backend, request: Request) -> list[Preset] | Rejection:
    """The presets to check for ``backend``: its own, or the checkpoint's config when the model is
    pre-quantized with its method; a whole-backend ``Rejection`` otherwise."""
    pre_method = request.pre_method
    if pre_method is not None and backend.name != pre_method:
        return Rejection(backend.name, None, f"the checkpoint is pre-quantized with {pre_method!r}")
    if not backend.available:
        st = backend.status
        return Rejection(backend.name, None, f"unavailable: {st.reason}", st.fix)
    if pre_method is None:
        if not backend.capabilities.quantizes:
            return Rejection(
                backend.name, None, "loads checkpoints written by other tools only; it does not quantize"
            )
        return presets_of(backend)
    try:
        config = backend.config.from_checkpoint(dict(request.size.pre_quantized))
    except ConfigError as exc:
        return Rejection(backend.name, None, f"the checkpoint's quantization_config is invalid: {exc}")
    bits = getattr(config, "bits", None)
    bits = bits if isinstance(bits, int) else max(backend.capabilities.bits)
    # servable as the declared preset whose config it is (none: no engine is claimed)
    same = [p for p in presets_of(backend) if _builds(p, backend) == config]
    servable = same[0].servable_by if same else ()
    return [Preset(name="checkpoint", config=config, bits=bits, servable_by=servable)]


def _builds(preset: Preset, backend: Backend) -> QuantConfig | None:
    try:
        return preset.build(backend.config)
    except ConfigError:
        return None


def servable_presets(engine: str) -> list[str]:
    """``backend:preset`` labels of the registered presets that declare ``engine`` in
    ``servable_by`` (backends that only load checkpoints are left out: they are never proposed)."""
    from . import backends

    return [
        f"{b.name}:{p.name}"
        for b in backends()
        if b.capabilities.quantizes
        for p in presets_of(b)
        if engine in p.servable_by
    ]


def check_engine(serve: Any) -> str:
    """``serve`` as a lowercase engine name; ``ConfigError`` when it is neither in ``KNOWN_ENGINES``
    nor declared by a registered preset."""
    from . import backends

    declared = {e for b in backends() for p in presets_of(b) for e in p.servable_by}
    allowed = sorted({*KNOWN_ENGINES, *declared})
    name = serve.strip().lower() if isinstance(serve, str) else serve
    if name not in allowed:
        raise ConfigError(
            f"serve {serve!r} is not a serving engine quantplug knows ({', '.join(KNOWN_ENGINES)}) or one "
            f"an installed preset declares ({', '.join(sorted(declared)) or 'none declares any'})",
            field="serve",
            value=serve,
            allowed=allowed,
        )
    return name


def _serve_rejection(preset: Preset, plugin: str, engine: str, serving: list[str]) -> tuple[str, str]:
    """Why ``engine`` does not qualify ``preset``, and the fix."""
    others = f"its plugin declares {', '.join(preset.servable_by)} only" if preset.servable_by else ""
    reason = f"{engine} does not serve its checkpoints as they are ({others or f'not declared by {plugin}'})"
    if serving:
        shown = ", ".join(serving[:6]) + (f" and {len(serving) - 6} more" if len(serving) > 6 else "")
        return f"{reason}; installed presets {engine} serves: {shown}", ""
    return (
        f"{reason}; no installed preset declares a checkpoint {engine} serves",
        f"install a plugin whose presets declare servable_by=({engine!r},); backends such as "
        f"compressed-tensors do",
    )


def _check(
    backend: Backend, preset: Preset, request: Request, notes: list[str], serving: Sequence[str] = ()
) -> Eligible | Rejection:
    """Every rule for one preset, in order: the serving engine, device, compute capability,
    trainability, calibration data, budget, a buildable config. The first rule it breaks rejects
    it. ``serving``: the labels of the presets the requested engine serves."""
    caps, size, hw = backend.capabilities, request.size, request.hardware
    devices = preset.devices or caps.devices
    trainable = preset.is_trainable(caps)
    calib = caps.needs_calibration if preset.needs_calibration is None else preset.needs_calibration
    bpw = preset.bits_per_weight or preset.bits + ASSUMED_GROUP_OVERHEAD_BITS
    from_checkpoint = request.pre_method and size.checkpoint_bytes
    predicted = size.checkpoint_bytes if from_checkpoint else size.predicted_bytes(bpw)

    def reject(reason: str, fix: str = "") -> Rejection:
        return Rejection(backend.name, preset.name, reason, fix, predicted)

    if request.serve is not None and request.serve not in preset.servable_by:
        return reject(*_serve_rejection(preset, backend.plugin or backend.name, request.serve, list(serving)))
    if preset.model_types and size.model_type not in preset.model_types:
        kinds = ", ".join(preset.model_types)
        what = f"this model is {size.model_type}" if size.model_type else "this model's type is not known"
        return reject(
            f"applies to {kinds} models only; {what}",
            ""
            if size.model_type
            else "pass the model, its folder or its config instead of a parameter count",
        )
    dev = hw.device
    if dev not in devices:
        return reject(f"does not run on {dev} (runs on {', '.join(devices)})")
    need = preset.min_cuda_capability
    if dev == "cuda" and need is not None:
        have = hw.cuda_capability
        if have is None:
            notes.append(
                f"{backend.name}:{preset.name} needs CUDA compute capability >= {need[0]}.{need[1]}; "
                f"the GPU's is unknown (not detected)"
            )
        elif tuple(have) < tuple(need):
            return reject(
                f"needs CUDA compute capability >= {need[0]}.{need[1]}; this GPU has {have[0]}.{have[1]}"
            )
    if request.finetune and not trainable:
        return reject("not trainable: its plugin does not declare that adapters can be trained on it")
    if calib and not request.calibration_data:
        return reject(
            "needs calibration data",
            "pass calibration_data=True (CLI: --calibration-data) if you have representative inputs",
        )
    budget = request.budget
    fits = None if budget is None else predicted <= budget
    if fits is False:
        return reject(f"over budget: predicted {fmt_bytes(predicted)} > {fmt_bytes(budget)}")
    try:
        config = preset_config(backend, preset)  # not built yet for a cached plugin: see Eligible
    except ConfigError as exc:
        return reject(f"its config is invalid: {exc}")
    return Eligible(backend, preset, config, bpw, predicted, fits, calib)
