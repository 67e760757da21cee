"""What quantplug records about each plugin (``PluginInfo``) and about what is wrong
(``Problem``), and the wording of the problems found across plugins rather than inside one: a
backend name registered by more than one plugin (ambiguous: which plugin to keep, and how) and a
plugin whose entry point import or ``register_backends`` hook is slow (which every command pays)."""

from __future__ import annotations

import dataclasses

from .backend import Backend

#: an entry point import (or a register_backends call) slower than this is a problem
SLOW_PLUGIN_SECONDS = 0.5


@dataclasses.dataclass
class PluginInfo:
    """One plugin as quantplug saw it, with how long its entry point import and its
    ``register_backends`` hook took."""

    name: str
    module: str = ""
    dist: str | None = None
    version: str | None = None
    backends: list[str] = dataclasses.field(default_factory=list)
    status: str = "loaded"  # loaded | disabled | failed
    error: str | None = None
    from_entry_point: bool = False
    import_seconds: float | None = None  # ep.load(); None when not imported from an entry point
    hook_seconds: float = 0.0  # register_backends, all calls together
    cached: bool = False
    """Read from the descriptor cache (``quantplug.descriptor_cache``): the entry point was not
    imported, and the timings are those of the import that wrote the cache."""

    @property
    def label(self) -> str:
        return self.dist or self.name


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something wrong with a plugin or backend, and what to do about it."""

    plugin: str
    problem: str
    fix: str
    backend: str | None = None

    def __str__(self) -> str:
        where = f"{self.plugin}" + (f" (backend {self.backend!r})" if self.backend else "")
        return f"{where}: {self.problem}\n    fix: {self.fix}"


Claims = list[tuple[PluginInfo, Backend]]


def _who(info: PluginInfo) -> str:
    if not info.from_entry_point:
        return f"{info.label} (registered at runtime)"
    return info.label if info.label == info.name else f"{info.label} (plugin {info.name})"


def _drop(infos: list[PluginInfo]) -> str:
    """How to make quantplug ignore ``infos``."""
    parts = []
    loaded = [i.name for i in infos if i.from_entry_point]
    if loaded:
        parts.append(f"QUANTPLUG_DISABLE_PLUGINS={','.join(loaded)}")
    parts += [f"quantplug.unregister_plugin({i.name!r})" for i in infos if not i.from_entry_point]
    return " and ".join(parts)


def choose_text(claims: Claims) -> str:
    """How to choose one of the plugins registering the same backend name."""
    ways = []
    for info, _ in claims:
        others = [i for i, _ in claims if i is not info]
        only = f", or load only it with QUANTPLUG_PLUGINS={info.name}" if info.from_entry_point else ""
        ways.append(f"to use {info.label}'s, set {_drop(others)}{only}")
    return "choose one: " + "; ".join(ways) + "; or uninstall the one you do not trust"


def ambiguity_message(name: str, claims: Claims) -> str:
    """The error for using an ambiguous backend name."""
    who = " and ".join(_who(info) for info, _ in claims)
    return (
        f"quant_method {name!r} is ambiguous: {len(claims)} installed plugins register it, {who}. "
        f"quantplug uses none of them rather than let the plugin that loads first quantize and load "
        f"{name!r} models with its code. To fix it, {choose_text(claims)}."
    )


def ambiguity_problems(name: str, claims: Claims) -> list[Problem]:
    """One problem per plugin registering the ambiguous backend name ``name``."""
    out = []
    for info, _ in claims:
        others = " and ".join(_who(i) for i, _ in claims if i is not info)
        out.append(
            Problem(
                info.label,
                f"registers backend {name!r}, which {others} also registers: the name is ambiguous, "
                f"so none of them is used (load order does not decide who owns a quant_method)",
                choose_text(claims),
                backend=name,
            )
        )
    return out


def slow_problems(info: PluginInfo) -> list[Problem]:
    """A problem for a slow entry point import and one for a slow ``register_backends``."""
    disable = f"report this to the maintainers of {info.label}, or disable it with QUANTPLUG_DISABLE_PLUGINS={info.name}"
    out = []
    if info.import_seconds is not None and info.import_seconds > SLOW_PLUGIN_SECONDS:
        out.append(
            Problem(
                info.label,
                f"importing its entry point module {info.module!r} takes {info.import_seconds:.2f} s "
                f"(over {SLOW_PLUGIN_SECONDS} s), which every quantplug command that quantizes or loads with it "
                "pays, and `quantplug list` too whenever its descriptors are not cached (after each install)",
                "keep the entry point module light: import the backend's library in the quantizer module "
                f"(Backend(quantizer='module:Class')), which quantplug imports on first use; {disable}",
            )
        )
    if info.hook_seconds > SLOW_PLUGIN_SECONDS:
        out.append(
            Problem(
                info.label,
                f"its register_backends hook takes {info.hook_seconds:.2f} s (over {SLOW_PLUGIN_SECONDS} s), "
                "which every quantplug command pays",
                "make register_backends only build descriptors: no library import, file or network "
                f"access; {disable}",
            )
        )
    return out
