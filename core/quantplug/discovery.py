"""Discovery: which plugins are installed and which backends they register. Plugin loading from
entry points in the ``quantplug`` group, allow/deny lists from the environment, per-plugin error
isolation, tracing, and the process-wide registry (``registry()``, ``register_plugin``,
``register_backend``, ``plugins()``, ``problems()``); dispatch is ``quantplug.dispatch``'s.

Each plugin is loaded and asked for its backends on its own. A plugin that fails to import,
raises in a hook or registers an invalid descriptor is recorded as a ``Problem`` (shown by
``quantplug doctor``); the other plugins are unaffected. A backend name registered by two plugins
is ambiguous: neither is used (load order never decides who owns a ``quant_method``), each
claimant gets a problem, and ``get_backend`` says how to choose. Each plugin's import and
``register_backends`` times are kept; a slow import is a problem too. What a plugin registered is
cached (``quantplug.descriptor_cache``): later processes do not import it, unless it opts out.

Environment:
    QUANTPLUG_PLUGINS          comma list of plugins to load (entry point or distribution names);
                               set but empty loads none
    QUANTPLUG_DISABLE_PLUGINS  comma list of plugins not to load
    QUANTPLUG_TRACE_PLUGINS=1  print each plugin load (with its import time) and hook call to stderr
(the two lists: ``quantplug.plugin_env``; a name that matches no installed plugin is a problem)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import pluggy

from . import descriptor_cache, hookspecs
from .backend import Backend
from .errors import PluginError
from .plugin_env import PluginFilter
from .plugin_env import norm as _norm
from .plugin_problems import PluginInfo, Problem, ambiguity_problems, slow_problems

ENTRY_POINT_GROUP = "quantplug"


class Registry:
    """The backends registered by plugins, and what went wrong while loading them."""

    def __init__(self) -> None:
        #: plugin name -> (entry point, cache key) of the plugins read from the descriptor cache
        self.from_cache: dict[str, tuple[Any, str]] = {}
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.trace = os.environ.get("QUANTPLUG_TRACE_PLUGINS", "") not in ("", "0")
        self.backends: dict[str, Backend] = {}
        #: backend name -> every (plugin, backend) registering it, when more than one does
        self.ambiguous: dict[str, list[tuple[PluginInfo, Backend]]] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.problems: list[Problem] = []

    # -- tracing ------------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        if self.trace:
            print(f"quantplug: {msg}", file=sys.stderr, flush=True)

    # -- loading ------------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        chosen = PluginFilter.from_env()
        seen, installed = set(), []
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            dist_version = dist.version if dist is not None else None
            key = (ep.name, ep.value, dist_name)
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            installed.append((ep.name, dist_name))
            info = PluginInfo(ep.name, ep.value, dist_name, dist_version, from_entry_point=True)
            why = chosen.disabled_by({_norm(ep.name)} | ({_norm(dist_name)} if dist_name else set()))
            if why is not None:
                info.status, info.error = "disabled", f"disabled by {why}"
                self.plugins.setdefault(ep.name, info)
                self._log(f"plugin {ep.name!r} disabled by {why}")
                continue
            self._load_entry_point(ep, dist, info)
        self.problems += [Problem(var, problem, fix) for var, problem, fix in chosen.unknown_names(installed)]

    def _load_entry_point(self, ep: Any, dist: Any, info: PluginInfo) -> None:
        """Register one entry point's backends: from the descriptor cache when it holds them (the
        module is not imported), else by importing it (and caching what it registered)."""
        key = descriptor_cache.fingerprint(ep, dist) if descriptor_cache.enabled() else None
        if key is not None:
            cached = descriptor_cache.read(ep, key, info.label, info.version or "")
            if cached is not None and self._taken(info) is None:
                info.import_seconds, info.hook_seconds = cached.import_seconds, cached.hook_seconds
                info.cached = True
                self.from_cache[info.name] = (ep, key)
                took = f"its import took {info.import_seconds * 1e3:.1f} ms when cached"
                self._log(
                    f"plugin {ep.name!r} ({info.dist} {info.version}) read from the descriptor cache, not imported ({took})"
                )
                self.plugins[info.name] = info
                for backend in cached.backends:
                    self.accept(info, backend)
                return
        self._log(f"loading plugin {ep.name!r} ({info.dist} {info.version}) from {ep.value}")
        t0 = time.perf_counter()
        try:
            obj = ep.load()
        except BaseException as exc:  # noqa: BLE001 - a plugin must never take the others down
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._import_failed(ep, key, info, exc)
            return
        info.import_seconds = time.perf_counter() - t0
        self._log(f"plugin {ep.name!r} imported in {info.import_seconds * 1e3:.1f} ms")
        before = len(self.problems)
        self._register(obj, info)
        opted_in = getattr(obj, "QUANTPLUG_CACHE_DESCRIPTORS", True) is not False  # see CONTRIBUTING 2
        clean = opted_in and key is not None and info.status == "loaded" and len(self.problems) == before
        mine = [self._claim(info, name) for name in info.backends] if clean else []
        if not (clean and descriptor_cache.write(ep, key, info.import_seconds, info.hook_seconds, mine)):
            # a plugin with a problem, one that opted out, or descriptors that are not plain data
            descriptor_cache.forget(ep, key)

    def _import_failed(self, ep: Any, key: str | None, info: PluginInfo, exc: BaseException) -> None:
        self._fail(
            info,
            f"failed to import {ep.value!r}: {type(exc).__name__}: {exc}",
            f"reinstall it (pip install --force-reinstall {info.dist or ep.name}) or disable it "
            f"with QUANTPLUG_DISABLE_PLUGINS={ep.name}",
        )
        descriptor_cache.forget(ep, key)

    def verify_cached(self) -> None:
        """Import the entry point module of every plugin read from the descriptor cache: one that
        fails is removed with its backends and recorded as a problem (and its record deleted), as
        if it had failed on load; the others get their import time measured now."""
        for name, (ep, key) in list(self.from_cache.items()):
            info = self.plugins[name]
            self._log(f"verifying cached plugin {name!r}: importing {ep.value}")
            t0 = time.perf_counter()
            try:
                ep.load()
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.remove_plugin(name)
                info.backends, info.cached = [], False
                self._import_failed(ep, key, info, exc)
            else:
                info.import_seconds, info.cached = time.perf_counter() - t0, False
            del self.from_cache[name]

    def _claim(self, info: PluginInfo, name: str) -> Backend:  # also when the name is ambiguous
        return next((b for i, b in self.ambiguous.get(name, []) if i is info), None) or self.backends[name]

    def _taken(self, info: PluginInfo) -> PluginInfo | None:  # the plugin already under its name
        other = self.plugins.get(info.name)
        return other if other is not None and other.status != "disabled" else None

    def add_plugin(
        self,
        obj: Any,
        *,
        name: str | None = None,
        module: str = "",
        dist: str | None = None,
        version: str | None = None,
    ) -> PluginInfo:
        """Register one plugin object (a module or any object with hookimpls) and collect its backends."""
        name = name or getattr(obj, "__name__", None) or repr(obj)
        return self._register(obj, PluginInfo(name, module or getattr(obj, "__name__", ""), dist, version))

    def _register(self, obj: Any, info: PluginInfo) -> PluginInfo:
        name, label = info.name, info.dist or info.name
        other = self._taken(info)
        if other is not None:
            return self._fail(
                info,
                f"a plugin named {name!r} is already registered "
                f"(from {other.dist or other.module or 'register_plugin'})",
                f"uninstall one of the two, or disable one with QUANTPLUG_DISABLE_PLUGINS={name}",
            )
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:  # pluggy validates hookimpl signatures here
            return self._fail(
                info,
                f"invalid plugin: {type(exc).__name__}: {exc}",
                f"report this to the maintainers of {label}; disable it with QUANTPLUG_DISABLE_PLUGINS={name}",
            )
        self.plugins[name] = info
        staged = []
        for impl in self.pm.hook.register_backends.get_hookimpls():
            if impl.plugin is not obj:
                continue
            t0 = time.perf_counter()
            try:
                impl.function(**{a: staged.append for a in impl.argnames})
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.pm.unregister(obj)
                return self._fail(
                    info,
                    f"register_backends raised {type(exc).__name__}: {exc}",
                    f"report this to the maintainers of {label}; disable it with QUANTPLUG_DISABLE_PLUGINS={name}",
                )
            finally:
                info.hook_seconds += time.perf_counter() - t0
            self._log(
                f"{name}.register_backends(register) -> {[getattr(b, 'name', b) for b in staged]} "
                f"[{(time.perf_counter() - t0) * 1e3:.1f} ms]"
            )
        for backend in staged:
            self._add_backend(info, backend)
        return info

    def refusal(self, backend: Any, label: str) -> tuple[str, str | None] | None:
        """Why ``backend``, registered by ``label``, cannot be registered at all (not a ``Backend``,
        an invalid descriptor); ``None`` when it can be. A taken name is not a refusal: the name
        becomes ambiguous (see ``accept``); ``owners`` says who holds a name."""
        if not isinstance(backend, Backend):
            return f"registered {type(backend).__name__!r}, not a quantplug.Backend", None
        bad = backend.problems()
        if bad:
            return "invalid backend descriptor: " + "; ".join(bad), None
        return None

    def owners(self, name: str) -> list[str]:
        """The plugins (distribution or plugin names) registering backend ``name``: none, one, or
        more when it is ambiguous."""
        if name in self.ambiguous:
            return [b.plugin or info.name for info, b in self.ambiguous[name]]
        return [self.backends[name].plugin or "another plugin"] if name in self.backends else []

    def accept(self, info: PluginInfo, backend: Backend) -> None:
        """Register ``backend`` (already checked by ``refusal``) as ``info``'s. When another plugin
        already registered that name, the name becomes ambiguous: no plugin gets it."""
        label, version = info.dist or info.name, info.version or backend.plugin_version
        if (backend.plugin, backend.plugin_version) != (label, version):  # a cached one is filled in
            backend = dataclasses.replace(backend, plugin=label, plugin_version=version)
        if backend.name in self.backends:
            self.ambiguous[backend.name] = [(self._owner(backend.name), self.backends.pop(backend.name))]
        info.backends.append(backend.name)
        if backend.name in self.ambiguous:
            self.ambiguous[backend.name].append((info, backend))
            self._log(f"backend {backend.name!r} is ambiguous: {', '.join(self.owners(backend.name))}")
            return
        self.backends[backend.name] = backend
        self._log(f"backend {backend.name!r} registered by {label}")

    def _owner(self, name: str) -> PluginInfo:
        return next(p for p in self.plugins.values() if p.status != "disabled" and name in p.backends)

    def _add_backend(self, info: PluginInfo, backend: Any) -> None:
        refused = self.refusal(backend, info.dist or info.name)
        if refused is None and backend.name in info.backends:
            refused = (f"registers backend name {backend.name!r} twice; the second one is ignored", None)
        if refused is None:
            self.accept(info, backend)
            return
        problem, fix = refused
        fix = fix or (
            f"report this to the maintainers of {info.dist or info.name}; disable it with "
            f"QUANTPLUG_DISABLE_PLUGINS={info.name}"
        )
        name = getattr(backend, "name", None) if isinstance(backend, Backend) else None
        self._problem(info, problem, fix, backend=None if name is None else str(name))

    def remove_plugin(self, name: str) -> None:
        info = self.plugins.pop(name, None)
        if info is None:
            raise KeyError(
                f"no plugin named {name!r}; registered: {', '.join(sorted(self.plugins)) or 'none'}"
            )
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        for backend in info.backends:
            claims = [c for c in self.ambiguous.pop(backend, []) if c[0] is not info]
            if len(claims) == 1:  # the one left owns the name again
                self.backends[backend] = claims[0][1]
            elif claims:
                self.ambiguous[backend] = claims
            else:
                self.backends.pop(backend, None)
        self.problems = [p for p in self.problems if p.plugin not in (name, info.dist)]

    def _fail(self, info: PluginInfo, problem: str, fix: str) -> PluginInfo:
        info.status, info.error = "failed", problem
        self.plugins.setdefault(info.name, info)
        self._problem(info, problem, fix)
        return info

    def _problem(self, info: PluginInfo, problem: str, fix: str, backend: str | None = None) -> None:
        self._log(f"problem in {info.name}: {problem}")
        self.problems.append(Problem(info.dist or info.name, problem, fix, backend))

    # -- queries ------------------------------------------------------------------------------

    def plugin_problems(self) -> list[Problem]:
        """What went wrong loading plugins, ambiguous backend names, and slow plugins."""
        out = list(self.problems)
        for name in sorted(self.ambiguous):
            out += ambiguity_problems(name, self.ambiguous[name])
        return out + [p for k in sorted(self.plugins) for p in slow_problems(self.plugins[k])]

    def all_problems(self) -> list[Problem]:
        """Plugin problems plus every registered backend that cannot run here."""
        out = self.plugin_problems()
        for b in self.sorted_backends():
            if not b.available:
                out.append(Problem(b.plugin or "?", b.status.reason, b.status.fix, backend=b.name))
        return out

    def sorted_backends(self) -> Iterable[Backend]:
        return [self.backends[k] for k in sorted(self.backends)]


# -- the process-wide registry -------------------------------------------------------------------

_lock = threading.RLock()
_registry: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _registry
    with _lock:
        if _registry is None:
            reg = Registry()
            reg.load_entry_points()
            _registry = reg
        return _registry


def reload_plugins() -> None:
    """Forget everything loaded and read the entry points (and environment variables) again.
    Plugins registered programmatically are dropped too."""
    global _registry
    with _lock:
        _registry = None


def verify_plugins() -> Registry:
    """Import the entry point module of every plugin whose descriptors were read from the cache
    (``Registry.verify_cached``): what ``quantplug doctor`` runs first, so a plugin that no longer
    imports is named even while its cached descriptors are unchanged."""
    with _lock:
        reg = registry()
        reg.verify_cached()
        return reg


def register_plugin(plugin: Any, name: str | None = None) -> PluginInfo:
    """Register a plugin object (a module or object with ``@quantplug.hookimpl`` functions) at runtime,
    e.g. in a test or a notebook. Problems are recorded like an entry point's, not raised."""
    with _lock:
        return registry().add_plugin(plugin, name=name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin and the backends it registered."""
    with _lock:
        registry().remove_plugin(name)


def register_backend(backend: Backend) -> None:
    """Register one backend directly (a shortcut for a one-backend plugin, e.g. in a test or a
    notebook; it shows in ``plugins()`` as ``inline:<name>``). Raises ``PluginError`` when the
    descriptor is invalid or the name is taken; nothing is recorded then."""
    name = f"inline:{getattr(backend, 'name', backend)}"
    with _lock:
        reg = registry()
        refused = reg.refusal(backend, name)
        if refused is not None:
            raise PluginError(f"{refused[0]}; fix the descriptor and register it again")
        owners = reg.owners(backend.name)
        if owners:
            raise PluginError(
                f"backend name {backend.name!r} is already registered by {' and '.join(owners)}; "
                f"register yours under another name, or unregister that plugin first"
            )
        info = PluginInfo(name)
        reg.plugins[name] = info
        reg.accept(info, backend)


def plugins() -> list[PluginInfo]:
    return [registry().plugins[k] for k in sorted(registry().plugins)]


def problems() -> list[Problem]:
    """What is wrong with installed plugins and backends, each with its fix."""
    return registry().all_problems()
