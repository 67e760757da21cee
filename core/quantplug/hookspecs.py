"""The pluggy hook specifications a quantplug plugin implements.

A plugin is a module named by an entry point in the ``quantplug`` group. It implements hooks by
decorating functions with ``quantplug.hookimpl``. Each hook is called once per plugin, in
isolation: an exception in one plugin's hook is recorded (see ``quantplug doctor``) and the
other plugins keep working.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("quantplug")
hookimpl = pluggy.HookimplMarker("quantplug")


@hookspec
def register_backends(register: Callable) -> None:
    """Register this plugin's backends by calling ``register(backend)`` once per ``quantplug.Backend``.

    Example (a complete plugin module, named by ``[project.entry-points.quantplug]``)::

        import quantplug
        from .config import MyConfig          # a light QuantConfig dataclass

        @quantplug.hookimpl
        def register_backends(register):
            register(quantplug.Backend(
                name="mymethod",
                config=MyConfig,
                quantizer="quantplug_mymethod.quantizer:MyQuantizer",
                capabilities=quantplug.Capabilities(bits=(4, 8), devices=("cpu", "cuda")),
                requires=("mylib>=1.2,<2",),
            ))
    """
