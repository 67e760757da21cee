"""Naming candidates: a backend's presets, and ``"backend:preset"`` labels to and from configs.

Shared by ``select`` (which ranks presets), ``compare`` (which measures labelled configs) and the
CLI (``quantize --preset``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .backend import Backend
from .capabilities import Preset
from .config import QuantConfig
from .errors import ConfigError


def presets_of(backend: Backend) -> list[Preset]:
    """The backend's declared presets, or one per supported bit width from ``config.for_bits``."""
    if backend.presets:
        return list(backend.presets)
    out = []
    for bits in sorted(backend.capabilities.bits, reverse=True):
        try:
            config = backend.config.for_bits(bits)
        except (ConfigError, TypeError, ValueError):
            continue
        out.append(Preset(name=f"{bits}bit", config=config, bits=bits, note="derived from for_bits"))
    return out


@dataclasses.dataclass
class Spec:
    """A candidate to measure: a label and a config."""

    label: str
    config: QuantConfig
    select_rank: int | None = None
    dtype: str | None = None
    """The model dtype the candidate is built in (its preset's ``dtype``; None: the model's own)."""


def resolve(spec: Any) -> Spec:
    """A ``Spec`` from ``"backend:preset"``, ``"backend"`` (its first preset), a config object or a
    config dict. The preset name is matched case-insensitively (``"compressed-tensors:W4A16"``
    names preset ``w4a16``). Raises ``ConfigError`` / ``UnknownMethodError`` naming what is wrong."""
    from .dispatch import as_config, get_backend

    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, str):
        name, _, preset = spec.partition(":")
        backend = get_backend(name.strip())
        presets = presets_of(backend)
        if not preset:
            if not presets:
                raise ConfigError(
                    f"backend {backend.name!r} declares no presets; give a config", field="candidates"
                )
            chosen = presets[0]
        else:
            wanted = preset.strip()
            found = [p for p in presets if p.name == wanted] or [
                p for p in presets if str(p.name).lower() == wanted.lower()
            ]
            if not found:
                raise ConfigError(
                    f"backend {backend.name!r} has no preset {preset!r}; its presets: "
                    f"{', '.join(p.name for p in presets) or 'none'}",
                    field="candidates",
                    value=spec,
                    allowed=[f"{backend.name}:{p.name}" for p in presets],
                )
            chosen = found[0]
        return Spec(f"{backend.name}:{chosen.name}", chosen.build(backend.config), dtype=chosen.dtype)
    config = as_config(spec)
    preset = preset_of(config)
    if preset is not None:  # a config equal to a preset is that preset, built in its dtype
        return Spec(_config_label(config), config, dtype=preset.dtype)
    return Spec(_config_label(config), config)


def preset_of(config: QuantConfig) -> Preset | None:
    """The preset of ``config``'s backend that builds exactly ``config`` (None: none does)."""
    from .dispatch import get_backend

    backend = get_backend(config.quant_method)
    for p in presets_of(backend):
        try:
            if p.build(backend.config) == config:
                return p
        except ConfigError:
            continue
    return None


def _config_label(config: QuantConfig) -> str:
    """``backend:preset`` when ``config`` equals one of its backend's presets, else the method with
    the fields that differ from its defaults, e.g. ``rtn(bits=3)``."""
    from .dispatch import get_backend

    preset = preset_of(config)
    if preset is not None:
        return f"{get_backend(config.quant_method).name}:{preset.name}"
    defaults = type(config)().to_dict() if _constructible(type(config)) else {}
    changed = {
        k: v for k, v in config.to_dict().items() if defaults.get(k, object()) != v and k != "quant_method"
    }
    inner = ",".join(f"{k}={v}" for k, v in changed.items())
    return f"{config.quant_method}({inner})" if inner else config.quant_method


def _constructible(cls: type[QuantConfig]) -> bool:
    try:
        cls()
    except Exception:
        return False
    return True
