"""Attributes computed on first read: a backend's config class read from the descriptor cache
(``quantplug.descriptor_cache``) and the configs ``select`` builds from it, so that naming and
ranking a plugin's presets does not import the plugin's module. No torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Deferred:
    """A value not built yet: ``build()`` makes it. ``as_dict`` is its ``to_dict()`` when known
    beforehand (so JSON output need not build it)."""

    __slots__ = ("build", "as_dict")

    def __init__(self, build: Callable[[], Any], as_dict: dict[str, Any] | None = None):
        self.build = build
        self.as_dict = as_dict


class LazyField:
    """A data descriptor for an attribute that may be given a ``Deferred``: it is built on first
    read and kept. Works on frozen dataclasses (their ``__init__`` sets fields through
    ``object.__setattr__``, which calls ``__set__``)."""

    def __init__(self, name: str):
        self.slot = f"_lazy_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.slot]
        if isinstance(value, Deferred):
            value = value.build()
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value

    def peek(self, obj: Any) -> Any:
        """The stored value, a ``Deferred`` when not built yet (nothing is built)."""
        return obj.__dict__[self.slot]


def config_dict(obj: Any, name: str = "config") -> dict[str, Any]:
    """``obj.<name>.to_dict()``, from the ``Deferred``'s ``as_dict`` when the config is not built."""
    field = getattr(type(obj), name, None)
    if isinstance(field, LazyField):
        raw = field.peek(obj)
        if isinstance(raw, Deferred) and raw.as_dict is not None:
            return dict(raw.as_dict)
    return getattr(obj, name).to_dict()
