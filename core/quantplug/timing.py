"""Latency for ``compare``, robust to the machine's load drifting during a run.

Timing candidates one after another lets drift decide the ranking (measured: the same fp32 model
decoded at 775 ms/token at the start of a run and 136 later). So the unquantized model stays
loaded and is timed in every round: each candidate's repeats alternate with the baseline's
(B C B C ... B), each candidate sample is divided by the mean of the baseline samples on either
side of it, and the candidate's latency is the median of those ratios times the baseline's median
over the whole run. The spread (half the range of the ratios, relative to their median) is
reported with each figure, and the recommendation does not rank on differences inside it
(``recommendation``). The baseline's own spread shows how much the machine drifted.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn

from .devices import run_batch
from .measure import Bench, Row, decode_ms, timed_ms

__all__ = ["PairedTiming"]


def _prefill_ms(model: nn.Module, bench: Bench) -> float:
    kwargs = {"use_cache": False} if bench.causal else {}
    with torch.no_grad():
        return timed_ms(lambda: run_batch(model, bench.prefill_in, **kwargs), bench.device)


def _once(model: nn.Module, bench: Bench) -> tuple[float, float | None]:
    """One prefill and (causal LMs) one decode timing of ``model``."""
    prefill = _prefill_ms(model, bench)
    decode = decode_ms(model, bench.prompt, bench.decode_tokens, bench.device) if bench.causal else None
    return prefill, decode


def warm_up(model: nn.Module, bench: Bench) -> None:
    """First calls pick kernels and allocate: not timed (a compiled model compiles here: every
    shape it is timed at, twice, since the second call of a new shape compiles it dynamic)."""
    with torch.no_grad():
        run_batch(model, bench.warm)
    for _ in range(2 if bench.compile else 0):
        _once(model, bench)


def _spread(values: list[float]) -> float | None:
    """Half the range of ``values`` relative to their median (None for fewer than two)."""
    if len(values) < 2:
        return None
    mid = statistics.median(values)
    return (max(values) - min(values)) / 2 / mid if mid else None


class PairedTiming:
    """Baseline samples collected over the whole run, and each candidate timed against them."""

    def __init__(self, baseline_row: Row, baseline: nn.Module, bench: Bench):
        self.baseline_row, self.baseline, self.bench = baseline_row, baseline, bench
        self.base: list[tuple[float, float | None]] = []
        self.ratios: dict[int, tuple[list[float], list[float]]] = {}
        warm_up(baseline, bench)
        self.base.append(_once(baseline, bench))
        self.finish([])

    def time(self, row: Row, model: nn.Module, say: Callable[[str], None]) -> None:
        """``repeats`` rounds of (candidate, baseline); the ratios are kept for ``finish``."""
        bench = self.bench
        say(
            f"    latency: {bench.repeats} round(s) of prefill and decode, each next to the unquantized model"
        )
        warm_up(model, bench)
        prefill, decode = [], []
        before = self.base[-1]
        for _ in range(bench.repeats):
            cand = _once(model, bench)
            after = _once(self.baseline, bench)
            self.base.append(after)
            prefill.append(cand[0] / ((before[0] + after[0]) / 2))
            if cand[1] is not None and before[1] and after[1]:
                decode.append(cand[1] / ((before[1] + after[1]) / 2))
            before = after
        self.ratios[id(row)] = (prefill, decode)
        self.finish([row])

    def finish(self, rows: list[Row]) -> None:
        """Fill the baseline's and ``rows``' latency and spread from the samples so far."""
        baseline_row = self.baseline_row
        base_prefill = [p for p, _ in self.base]
        base_decode = [d for _, d in self.base if d is not None]
        baseline_row.prefill_ms = statistics.median(base_prefill)
        baseline_row.prefill_spread = _spread(base_prefill)
        if base_decode:
            baseline_row.decode_ms = statistics.median(base_decode)
            baseline_row.decode_spread = _spread(base_decode)
        for row in rows:
            prefill, decode = self.ratios.get(id(row), ([], []))
            if prefill:
                row.prefill_ms = statistics.median(prefill) * baseline_row.prefill_ms
                row.prefill_spread = _spread(prefill)
            if decode and baseline_row.decode_ms is not None:
                row.decode_ms = statistics.median(decode) * baseline_row.decode_ms
                row.decode_spread = _spread(decode)
