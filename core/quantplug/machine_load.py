"""How busy the machine is with other work, for ``compare``'s latency figures.

On a 2-core machine a second busy process made torch's decode 20x slower (its threads
oversubscribed the cores) while the table still looked plausible. So ``compare`` measures the CPU
time other processes take, before the run (to choose how many threads torch uses: the cores
actually free) and over the whole run (to say when the latency figures are unreliable).

"Other processes" = the machine's busy CPU time (``/proc/stat``) minus this process's own
(``os.times``), in cores: 1.0 = one core kept busy by something else. Where ``/proc/stat`` is
missing (macOS, Windows) the 1-minute load average stands in, which counts this process too.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

__all__ = ["LoadMonitor", "free_cores", "others_busy"]

#: other processes using this many cores or more during a run make its latency figures unreliable
UNRELIABLE_BUSY_CORES = 0.25


def _proc_stat() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, or None without ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return (total - idle) / hz, total / hz


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclasses.dataclass
class _Sample:
    wall: float
    machine: tuple[float, float] | None
    own: float
    loadavg: float | None


def _sample() -> _Sample:
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return _Sample(time.perf_counter(), _proc_stat(), _own_cpu(), load)


def _busy_between(a: _Sample, b: _Sample) -> float | None:
    """Cores other processes kept busy between two samples (None: not measurable here)."""
    wall = b.wall - a.wall
    if a.machine is None or b.machine is None or wall <= 0:
        return None
    machine_busy = b.machine[0] - a.machine[0]
    return max(0.0, (machine_busy - (b.own - a.own)) / wall)


def others_busy(seconds: float = 1.0) -> float | None:
    """Cores other processes keep busy now, measured over ``seconds`` (this process sleeping);
    without ``/proc/stat``, the 1-minute load average (None where that is missing too)."""
    a = _sample()
    time.sleep(seconds)
    b = _sample()
    busy = _busy_between(a, b)
    return busy if busy is not None else b.loadavg


def free_cores(busy: float | None, cores: int | None = None) -> int:
    """Cores left for this process: all of them minus the busy ones, rounded, at least 1."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, round(cores - (busy or 0.0))))


class LoadMonitor:
    """What other processes took during a run (``start`` ... ``stop``), and whether that makes the
    run's latency figures unreliable."""

    def __init__(self) -> None:
        self.before: float | None = None
        self.during: float | None = None
        self._start: _Sample | None = None
        self._end: _Sample | None = None

    def start(self, busy_before: float | None) -> None:
        self.before = busy_before
        self._start = _sample()

    def stop(self) -> None:
        if self._start is None:
            raise RuntimeError("LoadMonitor.stop() before start()")
        self._end = _sample()
        self.during = _busy_between(self._start, self._end)

    @property
    def unreliable(self) -> bool | None:
        """True when other processes kept ``UNRELIABLE_BUSY_CORES`` or more busy during the run
        (None: not measurable here)."""
        if self.during is None:
            return None
        return self.during >= UNRELIABLE_BUSY_CORES

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 2)

        return {
            "other_processes_cores_before": r(self.before),
            "other_processes_cores_during": r(self.during),
            "loadavg_before": r(self._start.loadavg if self._start else None),
            "loadavg_after": r(self._end.loadavg if self._end else None),
            "measured_with": "/proc/stat minus this process" if self.during is not None else "load average",
            "unreliable": self.unreliable,
        }
