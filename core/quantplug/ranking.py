"""``select``'s second and third steps: set aside the dominated presets among those that passed
the filter (``eligibility``), score the others for a priority and workload, ranking them as
``Candidate``s, and explain each place and the selection as a whole.

Scores come from the plugins' declarations: the typical one-layer error, the stored bits per
weight and the measured speed per device and workload, except speeds measured on this machine by
``quantplug bench-presets`` (``speed_store``), which replace the declared ones unless
``select(local_speed=False)``. ``compare`` measures everything for real.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from .capabilities import WORKLOADS, Preset
from .config import QuantConfig
from .eligibility import Eligible, Rejection, Request
from .lazy import LazyField, config_dict
from .sizes import fmt_bytes
from .speed_store import DECLARED, MEASURED, LocalSpeeds

#: Relative errors below this are treated as equal when ranking: differences between 8-bit methods
#: (0.004 vs 0.01) do not show in a model's output, those between 4- and 2-bit methods do.
ERROR_FLOOR = 0.01

#: Bits per weight within this fraction of each other count as equal when presets are compared for
#: dominance: 8.016 vs 8.02 is a rounding of the same size, not a smaller model.
SIZE_TOLERANCE = 0.01

QUALITY_WORDS = ((0.02, "near-lossless"), (0.07, "small loss"), (0.15, "noticeable loss"))


@dataclasses.dataclass
class Candidate:
    """One ranked option: a backend and a concrete config, with its predictions and reasons."""

    backend: str
    preset: str
    config: QuantConfig
    bits: int
    bits_per_weight: float
    predicted_bytes: int
    fits: bool | None
    rel_error: float
    speed: float | None
    """Throughput vs the unquantized model for the device and workload (None: no figure): measured
    on this machine by ``quantplug bench-presets`` when stored, else declared by the plugin."""
    score: float = 0.0
    rank: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)
    servable_by: tuple[str, ...] = ()
    """Serving engines its plugin declares read its checkpoints as they are (``Preset.servable_by``)."""
    dtype: str | None = None
    """The model dtype the preset is built for (``Preset.dtype``; None: the model's own)."""
    speed_source: str | None = None
    """Where ``speed`` comes from: ``"measured here"`` (``quantplug bench-presets``), ``"declared"``
    (the plugin's ``Preset.speed``), or None (no figure)."""

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.preset}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "backend": self.backend,
            "preset": self.preset,
            "config": config_dict(self),
            "bits": self.bits,
            "bits_per_weight": self.bits_per_weight,
            "predicted_bytes": self.predicted_bytes,
            "fits": self.fits,
            "rel_error": self.rel_error,
            "speed": self.speed,
            "speed_source": self.speed_source,
            "score": round(self.score, 4),
            "reasons": list(self.reasons),
            "servable_by": list(self.servable_by),
            "dtype": self.dtype,
        }


# built on first read when ``select`` ranked a cached plugin's preset (``quantplug.lazy``)
Candidate.config = LazyField("config")  # type: ignore[assignment]


# -- set aside the dominated ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Figures:
    """What dominance compares: declared figures only (nothing assumed or guessed)."""

    label: str
    bits_per_weight: float
    rel_error: float
    speed: float | None
    speed_source: str | None
    may_dominate: bool
    """False when its eligibility is unsure (a CUDA capability that could not be checked)."""


def undominated(
    passed: list[Eligible], request: Request, workload: str, local: LocalSpeeds | None = None
) -> tuple[list[Eligible], list[Rejection]]:
    """The presets worth ranking, and a ``Rejection`` for each dominated one.

    A preset is dominated when another preset of the same backend, also in ``passed`` (so eligible
    for the same device, budget, calibration data and fine-tuning), declares no more bits per weight
    and no more typical error, one of the two smaller, and is not slower on this device and
    workload (by the figures measured here when ``local`` has them, else the declared ones). Sizes
    within ``SIZE_TOLERANCE`` and errors below ``ERROR_FLOOR`` count as equal, as in the ranking. Speed takes part because a bigger, less accurate preset can still be the
    fast one (torchao's float8-dynamic vs int8-weight-only on CUDA). Presets that do not declare
    both ``bits_per_weight`` and ``rel_error`` are never dominated and never dominate.
    """
    dev = request.hardware.device
    figures = [_figures(option, request, workload, local) for option in passed]
    same = [[option.backend.name == other.backend.name for other in passed] for option in passed]
    beaten = [
        [j for j, w in enumerate(figures) if j != i and same[i][j] and _dominates(w, d)]
        for i, d in enumerate(figures)
    ]
    kept, rejected = [], []
    for option, d, rivals in zip(passed, figures, beaten):
        if not rivals:
            kept.append(option)
            continue
        # name an undominated rival when there is one: the one the user sees ranked
        top = [j for j in rivals if not beaten[j]] or rivals
        w = min((figures[j] for j in top), key=lambda f: (f.rel_error, f.bits_per_weight, f.label))
        reason = _dominated_reason(w, d, dev, workload)
        rejected.append(
            Rejection(option.backend.name, option.preset.name, reason, "", option.predicted_bytes)
        )
    return kept, rejected


def _figures(option: Eligible, request: Request, workload: str, local: LocalSpeeds | None) -> _Figures | None:
    preset, hw = option.preset, request.hardware
    if preset.bits_per_weight is None or preset.rel_error is None:
        return None
    unsure = hw.device == "cuda" and preset.min_cuda_capability is not None and hw.cuda_capability is None
    speed, source = speed_of(option, hw.device, workload, local)
    label = f"{option.backend.name}:{preset.name}"
    bpw, err = float(preset.bits_per_weight), float(preset.rel_error)
    return _Figures(label, bpw, err, speed, source, not unsure)


def _dominates(w: _Figures | None, d: _Figures | None) -> bool:
    """Whether ``w`` dominates ``d``, two presets of one backend (see ``undominated``)."""
    if w is None or d is None or not w.may_dominate:
        return False
    ew, ed = max(w.rel_error, ERROR_FLOOR), max(d.rel_error, ERROR_FLOOR)
    size_le = w.bits_per_weight <= d.bits_per_weight * (1 + SIZE_TOLERANCE)
    size_lt = w.bits_per_weight * (1 + SIZE_TOLERANCE) < d.bits_per_weight
    d_faster = d.speed is not None and (w.speed is None or w.speed < d.speed)
    return size_le and ew <= ed and (size_lt or ew < ed) and not d_faster


def _dominated_reason(w: _Figures, d: _Figures, dev: str, workload: str) -> str:
    reason = (
        f"dominated by {w.label}: {w.bits_per_weight!r} vs {d.bits_per_weight!r} bits per weight, "
        f"declared error {w.rel_error!r} vs {d.rel_error!r}"
    )
    if d.speed is not None and w.speed_source == d.speed_source == DECLARED:
        reason += f", declared speed on {dev} at {workload} {w.speed:.2g}x vs {d.speed:.2g}x"
    elif d.speed is not None:
        w_speed = f"{w.speed:.2g}x ({w.speed_source})" if w.speed is not None else "no figure"
        reason += f", speed on {dev} at {workload} {w_speed} vs {d.speed:.2g}x ({d.speed_source})"
    equal = []
    if w.bits_per_weight > d.bits_per_weight:
        equal.append(f"sizes within {SIZE_TOLERANCE:.0%}")
    if w.rel_error > d.rel_error:
        equal.append(f"errors below {ERROR_FLOOR}")
    return reason + (f" ({' and '.join(equal)} count as equal)" if equal else "")


# -- score ----------------------------------------------------------------------------------------


def rank(
    passed: list[Eligible], dev: str, workload: str, priority: str, local: LocalSpeeds | None = None
) -> list[tuple[Candidate, Eligible]]:
    """A ``Candidate`` per eligible preset with its expected error and speed (measured here when
    ``local`` has it, else declared), ranked for ``priority`` (best first; ties by size, then
    label)."""
    ranked = []
    for option in passed:
        preset = option.preset
        err = _declared_error(option)
        if err is None:
            err = 2.0 ** -(preset.bits - 1)  # one quantization step relative to the range
        speed, source = speed_of(option, dev, workload, local)
        candidate = Candidate(
            backend=option.backend.name,
            preset=preset.name,
            config=Eligible.config.peek(option),  # built on first read (a cached plugin's)
            bits=preset.bits,
            bits_per_weight=option.bits_per_weight,
            predicted_bytes=option.predicted_bytes,
            fits=option.fits,
            rel_error=err,
            speed=speed,
            servable_by=preset.servable_by,
            dtype=preset.dtype,
            speed_source=source,
        )
        ranked.append((candidate, option))
    known = [c.speed for c, _ in ranked if c.speed is not None]
    # Unmeasured is not assumed fast: it ranks as the slowest known figure, and never faster than
    # the unquantized model.
    neutral = min([*known, 1.0])
    for c, _ in ranked:
        c.score = _score_value(
            priority, c.rel_error, c.predicted_bytes, c.speed if c.speed is not None else neutral
        )
    ranked.sort(key=lambda pair: (pair[0].score, pair[0].predicted_bytes, pair[0].label))
    for i, (c, _) in enumerate(ranked, 1):
        c.rank = i
    return ranked


def _declared_error(option: Eligible) -> float | None:
    preset = option.preset
    if preset.rel_error is not None:
        return preset.rel_error
    return option.backend.capabilities.max_rel_error.get(preset.bits)


def speed_of(
    option: Eligible, device: str, workload: str, local: LocalSpeeds | None
) -> tuple[float | None, str | None]:
    """The speed figure for ``option`` and its source: measured here (``local``, the figures stored
    for this machine and device) when there is one, else declared by its plugin, else None."""
    if local is not None:
        entry = local.entry(f"{option.backend.name}:{option.preset.name}", option.backend.plugin_version)
        value = _workload_figure(entry, workload) if entry is not None else None
        if value is not None:
            return value, MEASURED
    value = _speed_for(option.preset, device, workload)
    return value, (DECLARED if value is not None else None)


def _speed_for(preset: Preset, device: str, workload: str) -> float | None:
    return _workload_figure(preset.speed.get(device), workload)


def _workload_figure(figures: Mapping[str, float] | None, workload: str) -> float | None:
    """The figure for ``workload``; ``mixed`` is the geometric mean of decode and prefill."""
    if not figures:
        return None
    if workload == "mixed":
        vals = [figures[w] for w in WORKLOADS if w in figures]
        return math.exp(sum(math.log(v) for v in vals) / len(vals)) if len(vals) == len(WORKLOADS) else None
    return figures.get(workload)


def _score_value(priority: str, err: float, size: int, speed: float) -> float:
    """Lower is better. Balanced: the sum of log error (floored), log size and -log speed, so a
    2x smaller model, a 2x faster one and one with half the error count the same."""
    e, s, v = math.log(max(err, ERROR_FLOOR)), math.log(max(size, 1)), math.log(speed)
    if priority == "quality":
        return e * 1e6 + s - v
    if priority == "size":
        return s * 1e6 + e - v
    if priority == "speed":
        return -v * 1e6 + e + s
    return e + s - v


# -- explain --------------------------------------------------------------------------------------


def explain(
    c: Candidate,
    option: Eligible,
    request: Request,
    workload: str,
    priority: str,
    total: int,
    local: LocalSpeeds | None = None,
) -> Candidate:
    """``c`` with its reasons: its place, speed, quality, size, and what it needs."""
    backend, preset = option.backend, option.preset
    speed = _speed_reason(c, option, request.hardware.device, workload, local)
    guessed = "" if _declared_error(option) is not None else ", guessed from the bit width"
    quality = f"quality: typical 1-layer error {c.rel_error:.3f} ({_quality_word(c.rel_error)}{guessed})"
    size, budget = request.size, request.budget
    bpw_text = f"{c.bits_per_weight:g} bits per weight" + ("" if preset.bits_per_weight else " (assumed)")
    size_text = f"predicted {fmt_bytes(c.predicted_bytes)} ({bpw_text}; {fmt_bytes(size.unquantized_bytes)} unquantized)"
    if budget is not None:
        size_text += f"; fits {fmt_bytes(budget)} with {fmt_bytes(budget - c.predicted_bytes)} to spare"
    c.reasons = [_rank_reason(priority, c.rank, total), speed, quality, size_text]
    if request.serve is not None:
        c.reasons.append(
            f"{request.serve} serves its checkpoints as they are (declared by {backend.plugin or backend.name})"
        )
    if request.finetune:
        c.reasons.append("trainable: adapters (e.g. LoRA) can be trained on top of it")
    if option.needs_calibration:
        c.reasons.append("needs calibration data (you said you have some)")
    if preset.note:
        c.reasons.append(preset.note)
    return c


def _speed_reason(c: Candidate, option: Eligible, dev: str, workload: str, local: LocalSpeeds | None) -> str:
    """Where the speed figure comes from: measured here (and when), or declared by the plugin (on
    the machine the preset's note names as "<device> speed measured on <machine>")."""
    where = f"{dev} at {workload}"
    if c.speed is None:
        return (
            f"no speed figure declared or measured here for {where}: ranked as the slowest known one "
            f"(at most 1x); `quantplug bench-presets` or `quantplug compare` measures it"
        )
    if c.speed_source == MEASURED and local is not None:
        entry = local.entries.get(c.label, {})
        vs, date = entry.get("vs") or "unquantized", str(entry.get("date") or "")[:10]
        return (
            f"speed on {where}: {c.speed:.2g}x the unquantized {vs} model, measured here "
            f"(quantplug bench-presets, {date or 'undated'})"
        )
    plugin = option.backend.plugin or option.backend.name
    found = re.search(rf"\b{re.escape(dev)} speed measured on ([^;()]+)", option.preset.note or "")
    on = f" on {found.group(1).strip().rstrip('.,')}" if found else ""
    return f"speed on {where}: {c.speed:.2g}x the unquantized model (declared by {plugin}{on})"


def _quality_word(err: float) -> str:
    for bound, word in QUALITY_WORDS:
        if err <= bound:
            return word
    return "large loss"


def _rank_reason(priority: str, rank: int, total: int) -> str:
    basis = {
        "balanced": "balances quality, size and speed (log error + log size - log speed)",
        "quality": "lowest error first, then size and speed",
        "size": "smallest first, then error and speed",
        "speed": "fastest first (by the speed figure below), then error and size",
    }[priority]
    if rank == 1:
        return f"ranked first for priority={priority}: {basis}"
    return f"ranked {rank} of {total} for priority={priority}"


def notes(request: Request, candidates: list[Candidate], workload: str, filter_notes: list[str]) -> list[str]:
    """Notes on the whole selection: estimated sizes, the filter's notes, an unquantized model that
    already fits, no speed to gain, nothing trainable."""
    size, budget, dev = request.size, request.budget, request.hardware.device
    notes = [] if size.exact else [f"sizes are estimates: {size.source}"]
    notes += filter_notes
    if budget is not None and size.unquantized_bytes <= budget and request.pre_method is None:
        notes.append(
            f"the unquantized model ({fmt_bytes(size.unquantized_bytes)}) already fits the budget: "
            f"quantize only for speed or headroom"
        )
    known = [c.speed for c in candidates if c.speed is not None]
    if known and max(known) < 1:
        notes.append(
            f"no candidate's speed figure is faster than the unquantized model on {dev} at {workload}: "
            f"quantization buys memory here, not speed"
        )
    if request.finetune and not candidates:
        notes.append("no installed backend is declared trainable for this device")
    return notes
