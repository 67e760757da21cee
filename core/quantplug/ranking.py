"""``select``'s second and third steps: score the presets that passed the filter (``eligibility``)
for a priority and workload, ranking them as ``Candidate``s, and explain each place and the
selection as a whole.

Scores come from the plugins' declarations only: the typical one-layer error, the stored bits per
weight and the measured speed per device and workload (``compare`` measures them for real).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .capabilities import WORKLOADS, Preset
from .config import QuantConfig
from .eligibility import Eligible, Request
from .sizes import fmt_bytes

#: Relative errors below this are treated as equal when ranking: differences between 8-bit methods
#: (0.004 vs 0.01) do not show in a model's output, those between 4- and 2-bit methods do.
ERROR_FLOOR = 0.01

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
    """Declared throughput vs 16-bit for the device and workload (None: not declared)."""
    score: float = 0.0
    rank: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.preset}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "backend": self.backend,
            "preset": self.preset,
            "config": self.config.to_dict(),
            "bits": self.bits,
            "bits_per_weight": self.bits_per_weight,
            "predicted_bytes": self.predicted_bytes,
            "fits": self.fits,
            "rel_error": self.rel_error,
            "speed": self.speed,
            "score": round(self.score, 4),
            "reasons": list(self.reasons),
        }


# -- score ----------------------------------------------------------------------------------------


def rank(passed: list[Eligible], dev: str, workload: str, priority: str) -> list[tuple[Candidate, Eligible]]:
    """A ``Candidate`` per eligible preset with its expected error and declared speed, ranked for
    ``priority`` (best first; ties by size, then label)."""
    ranked = []
    for option in passed:
        preset = option.preset
        err = _declared_error(option)
        if err is None:
            err = 2.0 ** -(preset.bits - 1)  # one quantization step relative to the range
        candidate = Candidate(
            backend=option.backend.name,
            preset=preset.name,
            config=option.config,
            bits=preset.bits,
            bits_per_weight=option.bits_per_weight,
            predicted_bytes=option.predicted_bytes,
            fits=option.fits,
            rel_error=err,
            speed=_speed_for(preset, dev, workload),
        )
        ranked.append((candidate, option))
    known = [c.speed for c, _ in ranked if c.speed is not None]
    # Unmeasured is not assumed fast: it ranks as the slowest declared figure, and never faster than
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


def _speed_for(preset: Preset, device: str, workload: str) -> float | None:
    figures = preset.speed.get(device)
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
    c: Candidate, option: Eligible, request: Request, workload: str, priority: str, total: int
) -> Candidate:
    """``c`` with its reasons: its place, speed, quality, size, and what it needs."""
    backend, preset, dev = option.backend, option.preset, request.hardware.device
    where = f"{dev} at {workload}"
    if c.speed is not None:
        speed = f"speed on {where}: {c.speed:.2g}x the unquantized model (declared by {backend.plugin or backend.name})"
    else:
        speed = f"no speed figure declared for {where}: ranked as the slowest declared one (at most 1x); `quantplug compare` measures it"
    guessed = "" if _declared_error(option) is not None else ", guessed from the bit width"
    quality = f"quality: typical 1-layer error {c.rel_error:.3f} ({_quality_word(c.rel_error)}{guessed})"
    size, budget = request.size, request.budget
    bpw_text = f"{c.bits_per_weight:g} bits per weight" + ("" if preset.bits_per_weight else " (assumed)")
    size_text = f"predicted {fmt_bytes(c.predicted_bytes)} ({bpw_text}; {fmt_bytes(size.unquantized_bytes)} unquantized)"
    if budget is not None:
        size_text += f"; fits {fmt_bytes(budget)} with {fmt_bytes(budget - c.predicted_bytes)} to spare"
    c.reasons = [_rank_reason(priority, c.rank, total), speed, quality, size_text]
    if request.finetune:
        c.reasons.append("trainable: adapters (e.g. LoRA) can be trained on top of it")
    if option.needs_calibration:
        c.reasons.append("needs calibration data (you said you have some)")
    if preset.note:
        c.reasons.append(preset.note)
    return c


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
        "speed": "fastest (declared) first, then error and size",
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
    declared = [c.speed for c in candidates if c.speed is not None]
    if declared and max(declared) < 1:
        notes.append(
            f"no candidate is declared faster than the unquantized model on {dev} at {workload}: "
            f"quantization buys memory here, not speed"
        )
    if request.finetune and not candidates:
        notes.append("no installed backend is declared trainable for this device")
    return notes
