"""Which installed plugins the environment chooses: ``QUANTPLUG_PLUGINS`` (load only these) and
``QUANTPLUG_DISABLE_PLUGINS`` (do not load these), read when the registry loads. Says whether an
entry point is filtered out and by which variable, finds the names in either list that match no
installed plugin (a typo there would otherwise be ignored silently) and words what ``quantplug
list`` prints when every installed plugin is filtered out. Names are matched normalized (case,
``_`` and ``-`` alike) against entry point and distribution names."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable

ALLOW = "QUANTPLUG_PLUGINS"
DENY = "QUANTPLUG_DISABLE_PLUGINS"


def norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def env_list(var: str) -> set[str] | None:
    """The normalized names in ``var`` (a comma list); ``None`` when it is not set."""
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {norm(x) for x in raw.split(",") if x.strip()}


@dataclasses.dataclass(frozen=True)
class PluginFilter:
    """The allow and deny lists, as read from the environment."""

    allow: set[str] | None
    deny: set[str]

    @classmethod
    def from_env(cls) -> PluginFilter:
        return cls(env_list(ALLOW), env_list(DENY) or set())

    def disabled_by(self, names: set[str]) -> str | None:
        """The variable that filters out a plugin known by ``names`` (normalized), or ``None``."""
        if names & self.deny:
            return DENY
        if self.allow is not None and not names & self.allow:
            return ALLOW
        return None

    def unknown_names(self, installed: Iterable[tuple[str, str | None]]) -> list[tuple[str, str, str]]:
        """(variable, problem, fix) for each name in either list that matches no installed plugin;
        ``installed`` holds (entry point name, distribution name) pairs."""
        installed = sorted(set(installed))
        known = {norm(ep) for ep, _ in installed} | {norm(d) for _, d in installed if d}
        shown = ", ".join(f"{ep} [{dist}]" if dist else ep for ep, dist in installed) or "none"
        out = []
        for var, names in ((ALLOW, self.allow or set()), (DENY, self.deny)):
            for name in sorted(names - known):
                near = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                out.append(
                    (
                        var,
                        f"{name!r} matches no installed plugin, so it has no effect (installed plugins: {shown})",
                        f"correct or remove {name!r} in {var}{hint}: use an entry point or distribution "
                        f"name of an installed plugin",
                    )
                )
        return out


def all_disabled_message(disabled: Iterable[tuple[str, str | None]]) -> str:
    """What ``quantplug list`` says when no backend is registered because every installed plugin is
    filtered out; ``disabled`` holds (plugin name, reason such as "disabled by QUANTPLUG_PLUGINS")."""
    by_var: dict[str, list[str]] = {}
    for name, reason in disabled:
        var = DENY if DENY in (reason or "") else ALLOW
        by_var.setdefault(var, []).append(name)
    lines = [f"No backends enabled: {sum(map(len, by_var.values()))} plugin(s) are installed but disabled."]
    for var, names in sorted(by_var.items()):
        action = (
            f"remove their names from {DENY} (or unset it)"
            if var == DENY
            else f"add their names to {ALLOW} (or unset it to load every installed plugin)"
        )
        value = os.environ.get(var)
        lines.append(
            f"Disabled by {var} (set to {value!r}): {', '.join(sorted(names))}. To use them, {action}."
        )
    return "\n".join(lines)
