"""Speed figures measured on this machine (``quantplug bench-presets``, ``local_speed``): where they
are stored, the machine they belong to, and reading them back for ``select``. No torch.

One JSON file per machine and device type in the user's cache folder: ``$QUANTPLUG_CACHE_DIR``,
else ``$XDG_CACHE_HOME/quantplug``, else ``~/.cache/quantplug``; named
``speed-<machine key>.json``, the key made of the device type, the CPU model or GPU name, the CPU
core count and the torch version (``machine_key``). A file that cannot be read or parsed is
ignored with a warning: ``select`` then uses the declared figures.

A figure is the candidate's throughput divided by the unquantized model's on the same layers
(``baseline ms / candidate ms``, above 1 = faster), like ``Preset.speed``. Both baselines are
stored (float32 and, where the device runs it, bfloat16); the one ``select`` ranks by is the one
the plugins' declared figures are relative to on that device type (``REFERENCE_DTYPE``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cache_folder import cache_dir
from .hardware import Hardware
from .versions import installed_version

FORMAT = 1
MEASURED = "measured here"
DECLARED = "declared"

#: The unquantized model's dtype the ranked figure is relative to, per device type: the plugins'
#: declared CPU figures are against float32, their CUDA ones against bfloat16.
REFERENCE_DTYPE = {"cuda": "bfloat16"}


def reference_dtype(device: str) -> str:
    """The baseline dtype ``select`` ranks measured figures against on ``device`` (a type)."""
    return REFERENCE_DTYPE.get(device, "float32")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "unknown"


def machine_key(hw: Hardware) -> str:
    """``<device>-<CPU model or GPU name>-<N>c-torch<version>``, e.g.
    ``cpu-amd-epyc-7763-64-core-processor-2c-torch2-13-0-cpu``."""
    name = hw.name or (platform.machine() if hw.device == "cpu" else "")
    torch_version = installed_version("torch") or "none"
    return f"{_slug(hw.device)}-{_slug(name)}-{os.cpu_count() or 0}c-torch{_slug(torch_version)}"


def store_path(hw: Hardware) -> Path:
    """The JSON file holding the figures measured on ``hw`` (a device of this machine)."""
    return cache_dir() / f"speed-{machine_key(hw)}.json"


@dataclasses.dataclass
class LocalSpeeds:
    """The figures measured on this machine, as ``select`` uses them."""

    path: Path
    entries: dict[str, dict[str, Any]]
    """Per ``backend:preset`` label: ``decode`` / ``prefill`` ratios, ``date``, ``plugin_version``..."""
    stale: dict[str, str] = dataclasses.field(default_factory=dict)
    """Labels whose figures were measured with another plugin version: label -> why ignored."""

    def entry(self, label: str, plugin_version: str | None) -> dict[str, Any] | None:
        """The measured entry for ``label``, unless it was measured with another version of its
        plugin (then it is remembered in ``stale`` and None is returned)."""
        found = self.entries.get(label)
        if found is None:
            return None
        measured_with = found.get("plugin_version")
        if measured_with and plugin_version and measured_with != plugin_version:
            self.stale[label] = (
                f"measured with {found.get('plugin') or 'its plugin'} {measured_with}, installed {plugin_version}"
            )
            return None
        return found


def load(hw: Hardware) -> LocalSpeeds | None:
    """The figures stored for ``hw`` on this machine; None when there are none. A file that cannot
    be read or holds no valid figures is ignored with a ``UserWarning`` (never an error)."""
    path = store_path(hw)
    if not path.exists():
        return None
    data = _read(path)
    if data is None:
        return None
    entries, bad = {}, []
    for label, entry in (data.get("presets") or {}).items():
        if isinstance(entry, Mapping) and all(_positive(entry.get(w)) for w in ("decode", "prefill")):
            entries[str(label)] = dict(entry)
        else:
            bad.append(str(label))
    if bad:
        _warn(path, f"entries {', '.join(bad)} have no positive decode and prefill figures and are ignored")
    return LocalSpeeds(path, entries) if entries else None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        _warn(path, f"it cannot be read ({type(exc).__name__}: {exc}); it is ignored")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("presets", {}), dict):
        _warn(path, "it is not a quantplug bench-presets file (no 'presets' object); it is ignored")
        return None
    if data.get("format") != FORMAT:
        _warn(path, f"its format is {data.get('format')!r}, not {FORMAT}; it is ignored")
        return None
    return data


def _positive(value: Any) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value) and value > 0


def _warn(path: Path, what: str) -> None:
    warnings.warn(
        f"quantplug: local speed figures {path}: {what}; select uses the declared figures "
        f"(run `quantplug bench-presets` to measure them again)",
        UserWarning,
        stacklevel=3,
    )


def write(
    hw: Hardware,
    machine: dict[str, Any],
    run: dict[str, Any],
    entries: dict[str, dict[str, Any]],
    skipped: dict[str, str],
) -> Path:
    """Store ``entries`` (label -> figures) for ``hw`` with the ``machine`` and the ``run`` (its
    layers), keeping the entries of earlier runs for labels this run neither measured nor skipped
    (an unreadable earlier file is replaced). Written atomically."""
    path = store_path(hw)
    old: dict[str, Any] = {}
    if path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = _read(path) or {}
    presets = {k: v for k, v in (old.get("presets") or {}).items() if k not in skipped}
    presets.update(entries)
    old_skipped = {k: v for k, v in (old.get("skipped") or {}).items() if k not in entries}
    data = {
        "format": FORMAT,
        "machine": {"key": machine_key(hw), **machine},
        "updated": machine.get("date"),
        "last_run": run,
        "presets": dict(sorted(presets.items())),
        "skipped": dict(sorted({**old_skipped, **skipped}.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
