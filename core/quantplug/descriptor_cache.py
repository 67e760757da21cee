"""The descriptor cache: what each installed plugin registered, read back without importing it.

``quantplug list``, ``select`` and ``get_backend`` need a plugin's descriptors (``Backend``,
``Capabilities``, ``Preset``s), not its code. A plugin whose entry point module imports slowly
would make every command pay that import. So the first time an entry point loads cleanly (no
problem recorded for it), its descriptors are written to the cache folder
(``cache_folder.cache_dir()``: ``$QUANTPLUG_CACHE_DIR``, else ``$XDG_CACHE_HOME/quantplug``, else
``~/.cache/quantplug``) under ``plugins/``, one file per entry point and key, and later processes
build ``CachedBackend``s from it. A ``CachedBackend``'s config class (``Backend.config``) is
imported on first read, like its quantizer; ``select`` builds its presets' configs only when one is
used (``quantplug.lazy``).

The key (``fingerprint``) changes whenever the descriptors could: the entry point (name and
value), the distribution's name and version, its metadata folder (``.dist-info`` / ``.egg-info``:
path, inode and mtime, which a reinstall of the same version changes), the path, size and mtime of
every ``.py`` file of the entry point's top-level package (what an edit of an editable install
changes while the version does not), quantplug's version and this cache's format. A package of
more than ``MAX_FILES`` files, or one that cannot be located without importing it, is not cached.

Never trusted: a record is used only when it parses (``ast.literal_eval``: data, never code), names
the same key, and rebuilds into valid descriptors; anything else is ignored and rewritten. A
record is written only when reading it back gives descriptors equal to those the plugin registered.
A config class that no longer imports (a library removed under an unchanged plugin) raises
``BackendUnavailableError`` and deletes the record, so the next command imports the plugin for real
and reports it. ``quantplug doctor`` imports the module of every plugin read from the cache
(``discovery.verify_plugins``).
``QUANTPLUG_PLUGIN_CACHE=0`` turns the cache off (nothing read or written).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .backend import _TARGET_RE, Backend
from .cache_folder import cache_dir
from .capabilities import NAME_RE, Capabilities, Preset
from .config import QuantConfig
from .errors import BackendUnavailableError
from .lazy import Deferred, LazyField

FORMAT = 1
ENV_VAR = "QUANTPLUG_PLUGIN_CACHE"
MAX_FILES = 2000
MAX_RECORD_BYTES = 1 << 20


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "") != "0"


def folder() -> Path:
    return cache_dir() / "plugins"


# -- the key --------------------------------------------------------------------------------------


def _package_files(top: str) -> list[str] | None:
    """Every ``.py`` file of top-level module or package ``top``, located without importing it."""
    try:
        spec = importlib.util.find_spec(top)
    except Exception:  # noqa: BLE001 - whatever a finder raises, the plugin is imported, not cached
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots:
        return [spec.origin] if spec.origin and os.path.isfile(spec.origin) else None
    files: list[str] = []
    for root in roots:
        for base, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            files += [os.path.join(base, n) for n in sorted(names) if n.endswith(".py")]
            if len(files) > MAX_FILES:
                return None
    return files


def _stat_text(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


def fingerprint(ep: Any, dist: Any) -> str | None:
    """The cache key of entry point ``ep`` of distribution ``dist``; ``None`` when it cannot be
    made without importing the plugin (then the plugin is not cached)."""
    from . import __version__

    if dist is None:
        return None
    meta = getattr(dist, "_path", None)
    files = _package_files(ep.value.split(":")[0].split(".")[0].strip())
    if meta is None or files is None:
        return None
    try:
        parts = [_stat_text(os.fspath(meta))] + [_stat_text(f) for f in files]
    except OSError:
        return None
    head = [str(FORMAT), __version__, ep.name, ep.value, dist.metadata["Name"] or "", dist.version or ""]
    return hashlib.sha256("\n".join(head + parts).encode()).hexdigest()


def _path(ep_name: str, key: str) -> Path:
    return folder() / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', ep_name)[:60]}-{key[:32]}.txt"


# -- descriptors as data ----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` with mappings made dicts and tuples kept (``repr`` of it is a Python literal)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _fields(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}


def _encode_backend(backend: Backend) -> dict[str, Any] | None:
    cls = backend.config
    if "<" in cls.__qualname__:  # defined in a function: not importable by name
        return None
    presets = []
    for p in backend.presets:
        config = p.config.to_dict() if isinstance(p.config, QuantConfig) else _plain(p.config)
        presets.append({**_fields(p), "config": config, "built": p.build(cls).to_dict()})
    return {
        **_fields(backend, skip=("capabilities", "presets", "plugin", "plugin_version")),
        "config": f"{cls.__module__}:{cls.__qualname__}",
        "capabilities": _fields(backend.capabilities),
        "presets": presets,
    }


def _import_config(target: str) -> type[QuantConfig]:
    module, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _LazyConfig(LazyField):
    """``CachedBackend.config``: the class, imported on first read from its ``module:qualname``."""

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.slot]
        if isinstance(value, str):
            value = _resolve(obj, value)
            obj.__dict__[self.slot] = value
        return value


def _resolve(backend: CachedBackend, target: str) -> type[QuantConfig]:
    try:
        cls = _import_config(target)
        wrong = None
        if not (isinstance(cls, type) and issubclass(cls, QuantConfig)):
            wrong = "it is not a quantplug.QuantConfig subclass"
        elif cls.quant_method != backend.name:
            wrong = f"its quant_method is {cls.quant_method!r}"
    except Exception as exc:
        wrong = f"importing it failed: {type(exc).__name__}: {exc}"
    if wrong is None:
        return cls
    _unlink(backend.cache_file)
    raise BackendUnavailableError(
        f"backend {backend.name!r}: its config class {target!r}, read from quantplug's descriptor cache, "
        f"cannot be used: {wrong}. The cache entry is deleted; run `quantplug doctor` to see what is wrong "
        f"with {backend.plugin or 'the plugin'} (reinstall it if it is damaged)."
    )


class CachedBackend(Backend):
    """A ``Backend`` read from the descriptor cache: ``config`` is imported on first read."""

    config = _LazyConfig("config")  # type: ignore[assignment]
    cache_file: Path | None = None
    built_configs: dict[str, dict[str, Any]] = {}
    """Per preset name, its config's ``to_dict()`` as the real config class made it when cached."""

    def config_imported(self) -> bool:
        return not isinstance(type(self).config.peek(self), str)


def preset_config(backend: Backend, preset: Preset) -> Any:
    """``preset.build(backend.config)``; for a ``CachedBackend`` whose config class is not imported
    yet, a ``Deferred`` of it (the preset was built and checked when the cache was written)."""
    if (
        isinstance(backend, CachedBackend)
        and not backend.config_imported()
        and preset.name in backend.built_configs
        and preset in backend.presets
    ):
        return Deferred(lambda: preset.build(backend.config), backend.built_configs[preset.name])
    return preset.build(backend.config)


@dataclasses.dataclass
class CachedPlugin:
    """One entry point's record: its descriptors and the timings of the import that made it."""

    import_seconds: float
    hook_seconds: float
    backends: list[CachedBackend]


def _decode_backend(data: dict[str, Any], plugin: str, version: str, file: Path) -> CachedBackend:
    data = dict(data)
    capabilities = Capabilities(**data.pop("capabilities"))
    presets, built = [], {}
    for p in data.pop("presets"):
        p = dict(p)
        built[p["name"]] = dict(p.pop("built"))
        presets.append(Preset(**p))
    backend = CachedBackend(
        **data, capabilities=capabilities, presets=tuple(presets), plugin=plugin, plugin_version=version
    )
    object.__setattr__(backend, "cache_file", file)
    object.__setattr__(backend, "built_configs", built)
    return backend


def _light_problems(backend: CachedBackend) -> list[str]:
    """What ``Backend.problems`` checks that needs no config class (it was checked when cached)."""
    from packaging.requirements import Requirement

    out = []
    raw = type(backend).config.peek(backend)
    if not (isinstance(backend.name, str) and NAME_RE.match(backend.name)):
        out.append("name")
    for target in (raw, backend.quantizer):
        if not (isinstance(target, str) and _TARGET_RE.match(target)):
            out.append("target")
    caps = backend.capabilities
    if not caps.bits or not all(isinstance(b, int) and 1 <= b <= 32 for b in caps.bits):
        out.append("bits")
    if not isinstance(backend.transformers_format, bool):
        out.append("transformers_format")
    for preset in backend.presets:
        out += preset.problems(None)
    for req in backend.requires:
        Requirement(req)  # raises on a bad one: the record is not used
    return out


def read(ep: Any, key: str, plugin: str, version: str) -> CachedPlugin | None:
    """The record of ``ep`` under ``key``, or ``None`` (missing, unreadable, corrupt or stale)."""
    file = _path(ep.name, key)
    try:
        if file.stat().st_size > MAX_RECORD_BYTES:
            return None
        record = ast.literal_eval(file.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT or record.get("key") != key:
            return None
        backends = [_decode_backend(b, plugin, version, file) for b in record["backends"]]
        if any(_light_problems(b) for b in backends):
            return None
        return CachedPlugin(float(record["import_seconds"]), float(record["hook_seconds"]), backends)
    except Exception:  # noqa: BLE001 - whatever is wrong with a record, it is not used
        return None


def write(ep: Any, key: str, import_seconds: float, hook_seconds: float, backends: list[Backend]) -> bool:
    """Record ``backends`` (as registered, ``plugin`` filled in) for ``ep`` under ``key`` when they
    read back equal; True when written. Errors writing are ignored (the cache is an optimisation)."""
    try:
        encoded = [_encode_backend(b) for b in backends]
    except Exception:  # noqa: BLE001 - not representable as data: not cached
        return False
    if any(e is None for e in encoded):
        return False
    record = {
        "format": FORMAT,
        "key": key,
        "entry_point": f"{ep.name} = {ep.value}",
        "import_seconds": float(import_seconds),
        "hook_seconds": float(hook_seconds),
        "backends": encoded,
    }
    text = repr(record)
    file = _path(ep.name, key)
    try:
        back = [_decode_backend(b, "", "", file) for b in ast.literal_eval(text)["backends"]]
        if not all(_same(a, b) for a, b in zip(backends, back, strict=True)):
            return False
    except Exception:  # noqa: BLE001 - not representable as data: not cached
        return False
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, file)
    except OSError:
        return False
    return True


def _same(real: Backend, cached: CachedBackend) -> bool:
    """Whether ``cached`` describes ``real``; a preset given as a config object is cached as its
    ``to_dict()``, which must build an equal config."""
    for f in dataclasses.fields(Backend):
        if f.name not in ("plugin", "plugin_version", "presets") and getattr(real, f.name) != getattr(
            cached, f.name
        ):
            return False
    if len(real.presets) != len(cached.presets):
        return False
    for a, b in zip(real.presets, cached.presets):
        same_fields = all(
            getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(Preset) if f.name != "config"
        )
        if not same_fields or a.build(real.config) != b.build(real.config):
            return False
    return True


def forget(ep: Any, key: str | None) -> None:
    """Delete ``ep``'s record under ``key``, if any."""
    if key is not None:
        _unlink(_path(ep.name, key))


def _unlink(file: Path | None) -> None:
    if file is not None:
        with contextlib.suppress(OSError):
            file.unlink()
