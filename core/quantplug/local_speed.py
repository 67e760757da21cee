"""``bench_presets`` (``quantplug bench-presets``): measure on this machine how fast each installed
preset runs, so that ``select`` ranks by figures from here rather than from the plugin author's
machine.

The model measured is synthetic: Linear layers of the user's shapes (default: SmolLM2-135M's, a
small Llama), repeated until the weights outgrow the CPU caches, run at decode (1 row per call)
and prefill (256 rows on CPU, 2048 elsewhere). Each preset's copy of it, quantized through
``quantplug.quantize`` in the preset's dtype, is timed in rounds that alternate with the same
model unquantized in float32 and in bfloat16 (kept loaded the whole run): each candidate sample is
divided by the mean of the baseline samples on either side of it, and the median of those ratios
is the figure, so a machine whose load drifts does not decide it (as ``compare`` times latency).
Which presets are measured is ``select``'s filter (``eligibility``) for the device: unavailable
backends and presets that need calibration data are skipped with the reason. Results go to a JSON
file per machine (``speed_store``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import gc
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import __version__, speed_store
from .bench_shapes import Shape, model_shapes, parse_shapes, synthetic_plan
from .candidates import presets_of, resolve
from .convert import quantize
from .dispatch import get_backend
from .eligibility import Eligible, Request, eligible
from .hardware import Hardware, detect_hardware
from .model_size import model_size

__all__ = ["BenchResult", "bench_presets"]

MIN_ROUNDS = 3
MAX_ROUNDS = 15
DECODE_SAMPLE_MS = 20.0
"""A decode sample repeats the 1-row call until it lasts about this long (one call is too short to
time alone)."""
WORKLOADS = ("decode", "prefill")


def prefill_rows(device: str) -> int:
    """Rows of one prefill call: 256 on CPU, 2048 on accelerators (as ``compare``'s prompts)."""
    return 256 if device == "cpu" else 2048


@dataclasses.dataclass
class BenchResult:
    """What ``bench_presets`` measured and where it stored it."""

    path: Any
    machine: dict[str, Any]
    run: dict[str, Any]
    entries: dict[str, dict[str, Any]]
    skipped: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "machine": self.machine,
            "run": self.run,
            "presets": self.entries,
            "skipped": self.skipped,
        }

    def table(self) -> str:
        vs = self.run["vs"]
        lines = [
            f"machine: {self.machine['description']}, {self.machine['threads']} thread(s), "
            f"torch {self.machine['torch']}",
            f"layers: {', '.join(self.run['shapes'])} x {self.run['copies']} "
            f"({self.run['params'] / 1e6:.1f}M parameters); speed = unquantized {vs} ms / preset ms "
            f"(>1: faster)",
            "",
            f"{'preset':<30} {'dtype':<9} {'decode':>8} {'prefill':>8}   vs bfloat16 (decode, prefill)",
        ]
        for label, e in self.entries.items():
            bf = e.get("vs_bfloat16")
            other = f"{bf['decode']:.2f}x, {bf['prefill']:.2f}x" if bf else "-"
            lines.append(f"{label:<30} {e['dtype']:<9} {e['decode']:>7.2f}x {e['prefill']:>7.2f}x   {other}")
        if self.skipped:
            lines += ["", "skipped:", *(f"  {k}: {v}" for k, v in self.skipped.items())]
        return "\n".join(lines)


def bench_presets(
    shapes: Any = None,
    device: str = "cpu",
    presets: Sequence[str] | None = None,
    budget_s: float = 180.0,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Measure the decode and prefill speed of every installed preset eligible on ``device``
    against the unquantized model, store the figures for this machine and return them.

    ``shapes``: None (SmolLM2-135M's Linear shapes), weight shapes ``[(out, in), ...]`` or
    ``"OUTxIN"`` strings, a model folder, or an ``nn.Module`` (its distinct Linear shapes, most
    frequent first, capped so the run stays short). ``presets``: ``backend:preset`` labels or
    backend names (all their presets); default: every installed one. ``budget_s``: the time to
    aim for in total; each preset gets a share, and at least 3 rounds. ``log``: gets a progress
    line per step. Presets that cannot be measured are in ``skipped`` with the reason.
    """
    say = log or (lambda msg: None)
    hw = detect_hardware(device)
    dev = torch.device(device)
    plan = synthetic_plan(_shape_counts(shapes), hw.device)
    for note in plan.notes:
        say(f"note: {note}")
    options, skipped = _options(hw, presets, plan.params)
    say(
        f"bench-presets on {hw.describe()}: {len(options)} preset(s) to measure, {len(skipped)} skipped; "
        f"layers {', '.join(plan.labels)} x {plan.copies} ({plan.params / 1e6:.1f}M parameters)"
    )
    bases = _baselines(plan, dev, say) if options else {}
    start, entries = time.perf_counter(), {}
    for i, option in enumerate(options):
        label = f"{option.backend.name}:{option.preset.name}"
        share = (budget_s - (time.perf_counter() - start)) / (len(options) - i)
        say(f"[{i + 1}/{len(options)}] {label}")
        try:
            entries[label] = _measure(option, plan, bases, dev, share, say)
        except Exception as exc:  # a backend failing on these layers: reported, the run goes on
            skipped[label] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            say(f"    {skipped[label]}")
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    machine = _machine(hw)
    vs = speed_store.reference_dtype(hw.device)
    run = {**plan.describe(), "vs": vs if vs in bases or not bases else "float32", "baselines": list(bases)}
    run["budget_s"], run["seconds"] = budget_s, round(time.perf_counter() - start, 1)
    for entry in entries.values():
        entry.update(date=machine["date"], shapes=plan.labels, threads=machine["threads"])
    path = speed_store.write(hw, machine, run, entries, skipped)
    say(f"wrote {path}")
    return BenchResult(path, {"key": speed_store.machine_key(hw), **machine}, run, entries, skipped)


def _shape_counts(shapes: Any) -> dict[Shape, int]:
    if shapes is None or (isinstance(shapes, Sequence) and not isinstance(shapes, str)):
        return parse_shapes(shapes)
    return model_shapes(shapes)


def _options(
    hw: Hardware, wanted: Sequence[str] | None, params: int
) -> tuple[list[Eligible], dict[str, str]]:
    """The presets to measure (``select``'s filter on ``hw``, without a budget or calibration data)
    and the skipped ones with the reason; with ``wanted``, only those."""
    passed, rejected, _ = eligible(Request(model_size(params), hw, None, False, False))
    skipped = {f"{r.backend}:{r.preset}" if r.preset else r.backend: r.reason for r in rejected}
    if wanted is None:
        return passed, skipped
    labels = _wanted_labels(wanted)
    passed = [o for o in passed if f"{o.backend.name}:{o.preset.name}" in labels]
    kept = {}
    for label in labels:
        reason = skipped.get(label) or skipped.get(label.partition(":")[0])
        if reason is not None:
            kept[label] = reason
    return passed, kept


def _wanted_labels(wanted: Sequence[str]) -> list[str]:
    """``backend:preset`` labels (checked: an unknown one is a ``ConfigError``) of ``wanted``; a bare
    backend name stands for all its presets."""
    out: list[str] = []
    for item in wanted:
        if ":" in item:
            out.append(resolve(item).label)
        else:
            backend = get_backend(item.strip())
            out += [f"{backend.name}:{p.name}" for p in presets_of(backend)]
    return list(dict.fromkeys(out))


# -- the models and their timing ------------------------------------------------------------------


class _Layers(nn.Module):
    """The synthetic model: each layer applied to an input of its width (no chaining: the shapes
    need not compose)."""

    def __init__(self, shapes: Sequence[Shape], copies: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for _ in range(copies) for o, i in shapes)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = None
        for layer in self.layers:
            out = layer(inputs[str(layer.in_features)])
        return out


@dataclasses.dataclass
class _Runner:
    """A model with its decode and prefill inputs, timed one sample at a time."""

    model: nn.Module
    decode_in: dict[str, torch.Tensor]
    prefill_in: dict[str, torch.Tensor]
    device: torch.device
    calls: int = 1

    def _ms(self, inputs: dict[str, torch.Tensor], calls: int) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                self.model(inputs)
            sync()
        return (time.perf_counter() - t0) * 1e3 / calls

    def warm_up(self) -> None:
        """First calls pick kernels and allocate (not timed); sets the decode calls per sample."""
        self._ms(self.prefill_in, 1)
        self._ms(self.decode_in, 2)
        one = self._ms(self.decode_in, 3)
        self.calls = max(1, min(256, math.ceil(DECODE_SAMPLE_MS / max(one, 1e-3))))

    def once(self) -> dict[str, float]:
        return {"decode": self._ms(self.decode_in, self.calls), "prefill": self._ms(self.prefill_in, 1)}


def _inputs(plan: Any, dtype: torch.dtype, device: torch.device, rows: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    widths = sorted({i for _, i in plan.shapes})
    return {str(w): torch.randn(rows, w, generator=gen).to(device=device, dtype=dtype) for w in widths}


def _runner(model: nn.Module, plan: Any, dtype: torch.dtype, device: torch.device) -> _Runner:
    rows = prefill_rows(device.type)
    r = _Runner(model, _inputs(plan, dtype, device, 1), _inputs(plan, dtype, device, rows), device)
    r.warm_up()
    return r


def _baselines(plan: Any, device: torch.device, say: Callable[[str], None]) -> dict[str, _Runner]:
    """The unquantized model in float32 and, where the device runs it, bfloat16, warmed up."""
    torch.manual_seed(0)
    fp32 = _Layers(plan.shapes, plan.copies).to(device).eval().requires_grad_(False)
    out = {"float32": _runner(fp32, plan, torch.float32, device)}
    try:
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        out["bfloat16"] = _runner(bf16, plan, torch.bfloat16, device)
    except Exception as exc:  # a device without bfloat16 matmuls: float32 only
        say(f"note: no bfloat16 baseline on {device.type} ({type(exc).__name__}: {exc})")
    for name, r in out.items():
        first = r.once()
        say(f"unquantized {name}: decode {first['decode']:.2f} ms, prefill {first['prefill']:.1f} ms")
    return out


def _model_dtype(option: Eligible, device: torch.device) -> str:
    """The preset's dtype, else float32 on CPU and bfloat16 on accelerators."""
    return option.preset.dtype or ("float32" if device.type == "cpu" else "bfloat16")


def _measure(
    option: Eligible,
    plan: Any,
    bases: dict[str, _Runner],
    device: torch.device,
    budget_s: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """One preset: quantize a copy of the unquantized model in its dtype, then paired rounds."""
    dtype_name = _model_dtype(option, device)
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    source = bases.get(dtype_name, bases["float32"]).model
    model = copy.deepcopy(source).to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each distinct warning once, not once per forward
        report = quantize(model, option.config, device=device, progress=False)
        total = len(report.converted) + len(report.skipped)
        if not report.converted:
            why = next(iter(report.skipped.values()), "none eligible")
            raise RuntimeError(f"no layer was quantized ({why})")
        took = time.perf_counter() - t0
        say(f"    quantized {len(report.converted)}/{total} layers in {dtype_name} ({took:.1f} s)")
        cand = _runner(model, plan, dtype, device)
        timing = _paired(cand, bases, budget_s - (time.perf_counter() - t0))
    said = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    for text in said:
        say(f"    warning: {text}")
    vs = speed_store.reference_dtype(device.type)
    vs = vs if vs in timing["ratios"] else "float32"
    ratios = timing["ratios"]
    entry = {
        "decode": ratios[vs]["decode"],
        "prefill": ratios[vs]["prefill"],
        "vs": vs,
        **{f"vs_{name}": r for name, r in ratios.items()},
        "ms": timing["ms"],
        "rounds": timing["rounds"],
        "dtype": dtype_name,
        "converted": f"{len(report.converted)}/{total}",
        "config": option.config.to_dict(),
        "plugin": option.backend.plugin or option.backend.name,
        "plugin_version": option.backend.plugin_version or None,
        "quantplug": __version__,
        "warnings": said,
    }
    say(
        f"    {timing['rounds']} rounds: decode {entry['decode']:.2f}x, prefill {entry['prefill']:.2f}x "
        f"the unquantized {vs} model"
    )
    return entry


def _paired(cand: _Runner, bases: dict[str, _Runner], budget_s: float) -> dict[str, Any]:
    """Rounds of (candidate, each baseline) after one baseline sample each, until ``budget_s`` is
    spent (``MIN_ROUNDS`` to ``MAX_ROUNDS``). Per baseline and workload: the median over rounds of
    the mean of the baseline samples on either side of the candidate's, divided by it."""
    base = {name: [r.once()] for name, r in bases.items()}
    samples: list[dict[str, float]] = []
    t0 = time.perf_counter()
    while len(samples) < MAX_ROUNDS:
        elapsed = time.perf_counter() - t0
        per_round = elapsed / len(samples) if samples else 0.0
        if len(samples) >= MIN_ROUNDS and elapsed + per_round > budget_s:
            break
        samples.append(cand.once())
        for name, r in bases.items():
            base[name].append(r.once())
    n = len(samples)
    ratios = {
        name: {
            w: _r(statistics.median((b[i][w] + b[i + 1][w]) / 2 / samples[i][w] for i in range(n)))
            for w in WORKLOADS
        }
        for name, b in base.items()
    }
    ms = {"candidate": {w: _r(statistics.median(s[w] for s in samples)) for w in WORKLOADS}}
    ms.update(
        {name: {w: _r(statistics.median(s[w] for s in b)) for w in WORKLOADS} for name, b in base.items()}
    )
    return {"ratios": ratios, "ms": ms, "rounds": n}


def _r(value: float) -> float:
    return float(f"{value:.4g}")


def _machine(hw: Hardware) -> dict[str, Any]:
    return {
        "device": hw.device,
        "name": hw.name,
        "description": dataclasses.replace(hw, detected=True).describe(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
