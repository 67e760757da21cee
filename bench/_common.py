"""Helpers shared by the benchmarks in bench/: machine info, a fresh-subprocess runner that returns
the child's JSON, memory snapshots, medians and the RESULTS.md section updater.

This module imports nothing heavy (no torch), so a benchmark's parent process stays small and the
children it starts measure only their own work.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULT_MARKER = "@@BENCH_RESULT@@ "
RESULTS_MD_HEADER = (
    "# Benchmark results\n\n"
    "Figures recorded by the scripts in `bench/`. Each benchmark owns the section between its own\n"
    "`<!-- NAME:start -->` / `<!-- NAME:end -->` markers and rewrites only that section; the raw\n"
    "figures are in `bench/results/NAME.json`. Timings come from shared, noisy machines: read them\n"
    "as orders of magnitude, and re-run a benchmark before drawing conclusions from small differences.\n"
)

GB = 1e9
MiB = 2**20


# -- machine and versions -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed distribution versions (None when not installed), read without importing them."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """The repository's HEAD commit, with ``+dirty`` when the working tree has changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def git_diff_hash() -> str | None:
    """A short hash of the uncommitted changes to tracked files (None when there are none), so a
    result measured on a dirty tree can be matched to the code it ran."""
    try:
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return hashlib.sha256(diff).hexdigest()[:12] if diff else None


def machine_info(
    packages: Sequence[str] = ("torch", "transformers", "accelerate", "quantplug"),
) -> dict[str, Any]:
    """CPU model, cores, RAM, OS and the versions of Python and ``packages``."""
    ram = _ram_bytes()
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": ram,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(packages),
        "git_revision": git_revision(),
        "git_diff_sha256": git_diff_hash(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line for a results table: ``AMD EPYC, 2 cores, 23.4 GiB RAM, Linux-...``."""
    return f"{info['cpu_model']}, {info['cpu_cores']} cores, {info['ram_gib']} GiB RAM, {info['os']}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# -- memory ---------------------------------------------------------------------------------------


def memory_snapshot() -> dict[str, int | None]:
    """This process's memory now, in bytes: ``rss`` (VmRSS), ``hwm`` (VmHWM, the peak RSS of this
    process image) and ``ru_maxrss`` (getrusage peak RSS; kB on Linux, bytes on macOS)."""
    out: dict[str, int | None] = {"rss": None, "hwm": None}
    try:
        status = Path("/proc/self/status").read_text()
        for key, field in (("rss", "VmRSS"), ("hwm", "VmHWM")):
            m = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
            out[key] = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["ru_maxrss"] = maxrss if sys.platform == "darwin" else maxrss * 1024
    return out


def emit_result(result: dict[str, Any]) -> None:
    """Child side: print the result as one JSON line the parent's ``run_child`` picks out of stdout."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


class ChildError(RuntimeError):
    pass


def _parse_time_v(stderr: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if m:
        out["time_v_maxrss"] = int(m.group(1)) * 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    if m:
        secs = 0.0
        for part in m.group(1).split(":"):
            secs = secs * 60 + float(part)
        out["time_v_wall_s"] = secs
    return out


def run_child(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    time_v: bool = True,
    cwd: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``[sys.executable, *argv]`` in a fresh process and return the JSON it sent with
    ``emit_result``, plus ``process_wall_s`` (start to exit, interpreter start-up included) and, where
    ``/usr/bin/time -v`` exists and ``time_v`` is set, ``time_v_maxrss`` (bytes), measured outside
    the child as a cross-check of the child's own figures. Raises ``ChildError`` with the child's
    output tail when it fails or sends no result."""
    cmd = [sys.executable, *argv]
    timer = shutil.which("time", path="/usr/bin") if time_v else None
    if timer:
        cmd = [timer, "-v", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd
    )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-3000:]).strip()
        raise ChildError(f"child {' '.join(argv)} exited {proc.returncode}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_MARKER) :])
    result["process_wall_s"] = wall
    if timer:
        result.update(_parse_time_v(proc.stderr))
    return result


# -- statistics and formatting --------------------------------------------------------------------


def median(values: Sequence[float | int | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def medians(runs: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, float | None]:
    """The median of each numeric top-level field over ``runs`` (all numeric fields by default)."""
    if not runs:
        return {}
    if keys is None:
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: median([r.get(k) for r in runs]) for k in keys}


def fmt_gb(n: float | None, digits: int = 2) -> str:
    return "n/a" if n is None else f"{n / GB:.{digits}f} GB"


def fmt_s(s: float | None) -> str:
    return "n/a" if s is None else (f"{s:.1f} s" if s >= 10 else f"{s:.2f} s")


# -- results files --------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def update_results_section(name: str, body: str, path: str | os.PathLike = RESULTS_MD) -> Path:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in RESULTS.md with
    ``body`` (appending the section when it is missing, creating the file with a short header when
    the file is missing). Everything outside the section is left byte for byte as it was."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else RESULTS_MD_HEADER
    i, j = text.find(start), text.find(end)
    if i != -1 and j != -1 and j > i:
        text = text[:i] + section + text[j + len(end) :]
    elif i != -1 or j != -1:
        raise ValueError(f"{path}: section {name!r} has only one of its markers; fix the file by hand")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
