"""Which modules a config keeps in full precision: the one matcher for every skip list.

A config lists module names in ``modules_to_not_convert`` and, where its plugin declares them
(``QuantConfig.skip_aliases``), in other fields that carry the same meaning under another
library's name (Transformers' ``llm_int8_skip_modules``, HQQ's ``skip_modules``). Each pattern is
matched by the rules the config class names in ``QuantConfig.skip_rules``:

- ``"components"`` (quantplug's rule): the name equals the pattern, or the pattern is a run of whole
  dotted components of it (``mlp.down_proj`` matches ``model.layers.0.mlp.down_proj``).
- ``"transformers"`` (Transformers' ``modules_to_not_convert`` rule): the pattern, as a regular
  expression, matches the start of the name up to a module boundary, or the name ends with it.
- ``"linear_tag"`` (Transformers' HQQ rule): the name without ``model``, ``layers`` and layer
  numbers equals the pattern (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``).

Light: no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

RULES = ("components", "transformers", "linear_tag")

#: Transformers' module-boundary rule for skip patterns (transformers.quantizers.quantizers_utils)
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def linear_tag(name: str) -> str:
    """Transformers' HQQ "linear tag" of a module name: without ``model``, ``layers`` and layer
    numbers (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``)."""
    return ".".join(p for p in name.split(".") if p not in ("model", "layers") and not p.isnumeric())


def _matches(name: str, pattern: str, rule: str) -> bool:
    if rule == "components":
        return name == pattern or f".{pattern}." in f".{name}."
    if rule == "transformers":
        return bool(re.match(rf"(?:{pattern}){_BOUNDARY}", name)) or name.endswith(pattern)
    if rule == "linear_tag":
        return linear_tag(name) == pattern
    raise ValueError(f"unknown module matching rule {rule!r}; use one of {', '.join(RULES)}")


def matching_pattern(
    name: str, patterns: Iterable[str], rules: Iterable[str] = ("components",)
) -> str | None:
    """The first of ``patterns`` that matches module ``name`` by any of ``rules``, or ``None``."""
    rules = tuple(rules)
    for pattern in patterns:
        if any(_matches(name, pattern, rule) for rule in rules):
            return pattern
    return None


def matches(name: str, patterns: Iterable[str], rules: Iterable[str] = ("components",)) -> bool:
    """True when module ``name`` matches one of ``patterns`` by one of ``rules``."""
    return matching_pattern(name, patterns, rules) is not None


def skip_lists(config) -> dict[str, tuple[str, ...]]:
    """The config's skip lists by field: ``modules_to_not_convert`` (when not ``None``) and each
    field named in its ``skip_aliases`` (when set)."""
    out = {}
    for field in ("modules_to_not_convert", *type(config).skip_aliases):
        value = getattr(config, field)
        if value is not None:
            out[field] = tuple(value)
    return out


_RULE_WORDS = {
    "transformers": "as Transformers matches it",
    "linear_tag": "by its linear tag, as Transformers' HQQ matches it",
}


def listed_reason(name: str, config) -> str | None:
    """Why ``config`` keeps module ``name`` in full precision by one of its skip lists, or ``None``.
    A match by quantplug's own rule is preferred; the others are named in the reason."""
    lists = skip_lists(config)
    for field, patterns in lists.items():
        if matches(name, patterns):
            return f"listed in {field}"
    # a library's own rule is reported under the library's own field name first
    fields = sorted(lists, key=lambda f: f == "modules_to_not_convert")
    for rule in (r for r in type(config).skip_rules if r != "components"):
        for field in fields:
            patterns = lists[field]
            pattern = matching_pattern(name, patterns, (rule,))
            if pattern is not None:
                return f"matches {field} pattern {pattern!r} ({_RULE_WORDS[rule]})"
    return None
