"""``select``: rank the registered backends' presets for a model, a device and a memory budget,
with the reasons for every place and every rejection.

Nothing here knows any backend. Each plugin declares ``Capabilities`` and ``Preset``s (bits per
weight, devices, minimum CUDA capability, calibration, trainability, typical error, measured
speed); ``select`` filters and ranks those declarations, so a third-party plugin takes part as soon
as it is installed. No backend library (and, when the device is given, not even torch) is imported.
``compare`` then measures what ``select`` can only predict.

``select`` runs three steps: filter (``eligibility``: which presets may run here, and why not the
others), score (``ranking.undominated``: set aside a preset another of its backend beats on
declared size and error without being slower; ``ranking.rank``: rank the rest for the priority and
workload, by the speed figures ``quantplug bench-presets`` measured on this machine where
``speed_store`` holds them, else the declared ones) and explain (``ranking.explain`` and
``ranking.notes``: the reasons for each place, and notes on the whole selection). The model's size comes from ``model_size``, the
device from ``hardware``, and preset names from ``candidates``; their names are re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from .candidates import Spec, presets_of, resolve
from .eligibility import (
    ASSUMED_GROUP_OVERHEAD_BITS,
    KNOWN_ENGINES,
    Rejection,
    Request,
    check_engine,
    eligible,
)
from .errors import ConfigError
from .hardware import Hardware, detect_hardware
from .model_size import ASSUMED_UNQUANTIZED_SHARE, ModelSize, model_size
from .ranking import ERROR_FLOOR, SIZE_TOLERANCE, Candidate, explain, notes, rank, undominated
from .sizes import fmt_bytes, parse_size
from .speed_store import MEASURED, LocalSpeeds
from .speed_store import load as load_local_speeds

__all__ = [
    "ASSUMED_GROUP_OVERHEAD_BITS",
    "ASSUMED_UNQUANTIZED_SHARE",
    "ERROR_FLOOR",
    "KNOWN_ENGINES",
    "PRIORITIES",
    "SIZE_TOLERANCE",
    "Candidate",
    "Hardware",
    "ModelSize",
    "Priority",
    "Rejection",
    "Selection",
    "Spec",
    "Workload",
    "detect_hardware",
    "model_size",
    "presets_of",
    "resolve",
    "select",
]

Workload = Literal["decode", "prefill", "mixed"]
Priority = Literal["balanced", "quality", "size", "speed"]
PRIORITIES = ("balanced", "quality", "size", "speed")


@dataclasses.dataclass
class Selection:
    """What ``select`` returns: ranked candidates (best first), rejections, and the context."""

    hardware: Hardware
    model: ModelSize
    memory_budget: int | None
    workload: str
    priority: str
    finetune: bool
    calibration_data: bool
    candidates: list[Candidate]
    rejected: list[Rejection]
    notes: list[str]
    serve: str | None = None
    """The serving engine every candidate's checkpoints must be read by as they are (None: any)."""
    local_speed_file: str | None = None
    """The file of speed figures measured on this machine that ranked it (None: declared only)."""

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hardware": dataclasses.asdict(self.hardware),
            "model": {
                **{k: v for k, v in dataclasses.asdict(self.model).items() if k != "pre_quantized"},
                "pre_quantized": dict(self.model.pre_quantized) if self.model.pre_quantized else None,
                "unquantized_bytes": self.model.unquantized_bytes,
            },
            "memory_budget": self.memory_budget,
            "workload": self.workload,
            "priority": self.priority,
            "finetune": self.finetune,
            "calibration_data": self.calibration_data,
            "serve": self.serve,
            "local_speed_file": self.local_speed_file,
            "candidates": [c.to_dict() for c in self.candidates],
            "rejected": [r.to_dict() for r in self.rejected],
            "notes": list(self.notes),
        }

    def table(self, reasons_for: int | None = None) -> str:
        """The ranking as text for a terminal: every candidate with its reasons (only the first
        ``reasons_for`` candidates' reasons when given), and every rejection with its reason,
        grouped by backend (presets rejected for one reason share a line)."""
        lines = [f"device: {self.hardware.describe()}", f"model: {self.model.source}"]
        lines.append(
            f"unquantized: {fmt_bytes(self.model.unquantized_bytes)}"
            + (f"; budget: {fmt_bytes(self.memory_budget)}" if self.memory_budget else "")
            + f"; workload: {self.workload}; priority: {self.priority}"
            + ("; fine-tuning" if self.finetune else "")
            + (f"; served by {self.serve}" if self.serve else "")
        )
        lines += [f"note: {n}" for n in self.notes]
        lines.append("")
        if not self.candidates:
            lines.append("no candidate: every backend was rejected (see below)")
        for c in self.candidates:
            speed = f"{c.speed:.2g}x" if c.speed is not None else "?"
            speed += " (here)" if c.speed_source == MEASURED else ""
            lines.append(
                f"{c.rank:>2}. {c.label:<28} {fmt_bytes(c.predicted_bytes):>10}  "
                f"err~{c.rel_error:.3f}  speed {speed}"
            )
            if reasons_for is None or c.rank <= reasons_for:
                lines += [f"      - {r}" for r in c.reasons]
        if self.rejected:
            lines += ["", "rejected:", *self._rejection_lines()]
        return "\n".join(lines)

    def _rejection_lines(self) -> list[str]:
        """One line per backend and reason; presets over budget share one line with their sizes."""
        lines = []
        grouped: dict[tuple[str, str, str], list[str]] = {}
        for r in self.rejected:
            reason = r.reason if not r.reason.startswith("over budget") else "over budget"
            grouped.setdefault((r.backend, reason, r.fix), []).append(r.preset or "")
        for (backend, reason, fix), names in grouped.items():
            if reason == "over budget":
                sizes = {r.preset: r.predicted_bytes for r in self.rejected if r.backend == backend}
                reason = "over budget: " + ", ".join(f"{n} {fmt_bytes(sizes.get(n))}" for n in names)
                names = []
            total = sum(r.backend == backend for r in self.rejected) + sum(
                c.backend == backend for c in self.candidates
            )
            every = len(names) == total
            what = f"{backend}:{','.join(n for n in names if n)}" if any(names) and not every else backend
            lines.append(f"  {what}: {reason}" + (f" (fix: {fix})" if fix else ""))
        return lines


def select(
    model: Any,
    *,
    device: Hardware | str | None = None,
    memory_budget: int | str | None = None,
    finetune: bool = False,
    calibration_data: bool = False,
    workload: Workload = "decode",
    priority: Priority = "balanced",
    serve: str | None = None,
    local_speed: bool = True,
) -> Selection:
    """Rank every registered backend's presets for ``model`` on ``device``.

    ``model``: a parameter count (``7e9``), a model folder or its config.json, a Transformers
    config, or an ``nn.Module``. ``device``: ``cpu``/``cuda``/``mps`` (detected when None), or a
    ``Hardware`` (e.g. ``Hardware("cuda", cuda_capability=(8, 0))`` to plan for another machine).
    ``memory_budget``: bytes or ``"5GB"`` for the weights. ``finetune``: only backends declared
    trainable qualify. ``calibration_data``: whether you can provide calibration data.
    ``workload``: ``decode`` (token by token), ``prefill`` (long prompts, batch work) or
    ``mixed``. ``priority``: ``balanced``, ``quality``, ``size`` or ``speed``. ``serve``: a
    serving engine (``vllm``, ``sglang``, ``tgi`` or any an installed preset declares); only presets
    whose plugin declares that the engine reads their checkpoints as they are (``Preset.servable_by``)
    qualify, the others are rejected saying which installed presets it serves. ``local_speed``:
    rank by the speed figures ``quantplug bench-presets`` measured on this machine for the device
    where it stored them (each candidate's ``speed_source`` says which was used); False: by the
    figures the plugins declare only.
    Returns a ``Selection``; nothing is quantized and no backend library is imported.
    """
    workload = _choice(workload, ("decode", "prefill", "mixed"), "workload")
    priority = _choice(priority, PRIORITIES, "priority")
    budget = _budget(memory_budget)
    engine = None if serve is None else check_engine(serve)
    request = Request(model_size(model), detect_hardware(device), budget, finetune, calibration_data, engine)
    passed, rejected, filter_notes = eligible(request)
    local = load_local_speeds(request.hardware) if local_speed else None
    passed, dominated = undominated(passed, request, workload, local)
    rejected += dominated
    ranked = rank(passed, request.hardware.device, workload, priority, local)
    candidates = [explain(c, option, request, workload, priority, len(ranked), local) for c, option in ranked]
    all_notes = notes(request, candidates, workload, filter_notes) + _local_notes(local, candidates)
    return Selection(
        request.hardware,
        request.size,
        budget,
        workload,
        priority,
        finetune,
        calibration_data,
        candidates,
        rejected,
        all_notes,
        engine,
        str(local.path) if local is not None else None,
    )


def _local_notes(local: LocalSpeeds | None, candidates: list[Candidate]) -> list[str]:
    """Which speed figures were measured here, and those ignored as measured with another plugin
    version."""
    if local is None:
        return []
    here = [c for c in candidates if c.speed_source == MEASURED]
    out = [
        f"speed figures of {len(here)} of {len(candidates)} candidate(s) measured on this machine "
        f"(quantplug bench-presets, {local.path}); the others' figures, where any, are declared by their plugins"
    ]
    out += [
        f"the speed figure measured here for {label} is ignored: {why}; run `quantplug bench-presets` again"
        for label, why in local.stale.items()
    ]
    return out


def _choice(value: str, allowed: Sequence[str], field: str) -> str:
    if value not in allowed:
        raise ConfigError(
            f"{field} {value!r} is not one of {', '.join(allowed)}",
            field=field,
            value=value,
            allowed=list(allowed),
        )
    return value


def _budget(memory_budget: int | str | None) -> int | None:
    if memory_budget is None:
        return None
    try:
        return parse_size(memory_budget, "memory_budget")
    except ValueError as exc:
        raise ConfigError(str(exc), field="memory_budget", value=memory_budget) from None
