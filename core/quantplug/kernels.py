"""Kernels apart from formats: which matmul runs an integer-grid layer on this device.

A quantized layer's speed should depend on what it holds, not on which plugin loaded it. A layer a
backend describes as an ``IntegerGrid`` (``Quantizer.integer_grid``) and can rebuild from one
(``Quantizer.encode_grid``) runs on the fastest registered ``Kernel`` that takes its grid's shape
(bits, group size, zero points, act-order) on the layer's device and in the model's dtype; the
plugin keeps its checkpoint layout (``quantplug.save`` rebuilds the plugin's module from the grid
and writes exactly what the plugin would have), and the repack happens once, at load or quantize.

Kernels are registered like backends: ``quantplug.register_kernel(kernel)`` in a process, or an
entry point in the ``quantplug_kernels`` group naming a ``"module:Class"`` (a kernel plugin:
Marlin, gemlite, ggml-style, ...), loaded when a model first needs a kernel. quantplug ships
torch's own fused CPU kernels (``quantplug.torch_kernels``): ``torch-int4-cpu``
(``aten._weight_int4pack_mm_for_cpu``) and ``torch-int8-cpu`` (``aten._weight_int8pack_mm``).

Light: no torch import at module level.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .errors import PluginError
from .kernel_base import Kernel

if TYPE_CHECKING:  # pragma: no cover
    from .grid import GridLayout

logger = logging.getLogger("quantplug")

ENTRY_POINT_GROUP = "quantplug_kernels"
AUTO, NONE, REQUIRED = "auto", "none", "required"
"""``kernel=`` values of ``quantize`` / ``load`` besides a kernel's name."""


BUILTIN_NAMES = ("torch-int4-cpu", "torch-int8-cpu")
"""The kernels quantplug ships (``quantplug.torch_kernels``), named without importing torch."""

_registered: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> None:
    """Make ``kernel`` available to every model loaded or quantized from now on in this process."""
    if not isinstance(kernel, Kernel) or not kernel.name:
        raise PluginError(f"register_kernel needs a quantplug.Kernel instance with a name, got {kernel!r}")
    _registered[kernel.name] = kernel
    _machine_problem.cache_clear()


def unregister_kernel(name: str) -> None:
    _registered.pop(name, None)


@functools.cache
def _entry_point_kernels() -> tuple[dict[str, Kernel], dict[str, str]]:
    """The kernels named by installed ``quantplug_kernels`` entry points, and the problems of
    those that failed to load (name -> why)."""
    from importlib import import_module

    found: dict[str, Kernel] = {}
    failed: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            module, _, attr = ep.value.partition(":")
            obj = getattr(import_module(module), attr)
            kernel = obj() if isinstance(obj, type) else obj
            if not isinstance(kernel, Kernel):
                raise TypeError(f"{ep.value} is not a quantplug.Kernel")
            found[kernel.name or ep.name] = kernel
        except Exception as exc:  # one broken kernel plugin must not stop loading models
            failed[ep.name] = f"{type(exc).__name__}: {exc}"
            logger.warning("quantplug: kernel entry point %r (%s) failed to load: %s", ep.name, ep.value, exc)
    return found, failed


def available_kernels() -> dict[str, Kernel]:
    """Every kernel quantplug can run here, by name: torch's own CPU kernels, the installed kernel
    plugins' and those registered in this process (which win on a name clash)."""
    from .torch_kernels import BUILTIN

    out = {k.name: k for k in BUILTIN}
    out.update(_entry_point_kernels()[0])
    out.update(_registered)
    return out


def kernel_names() -> dict[str, str]:
    """Every kernel's name -> where it comes from ("built in", or the entry point's value), read from
    metadata only (imports neither torch nor a kernel plugin: for ``quantplug list``)."""
    out = dict.fromkeys(BUILTIN_NAMES, "built in")
    out.update({ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)})
    out.update(dict.fromkeys(_registered, "registered in this process"))
    return out


def kernel_problems() -> dict[str, str]:
    """Kernel entry points that failed to load, with why (for ``quantplug doctor``)."""
    return dict(_entry_point_kernels()[1])


@functools.cache
def _machine_problem(name: str) -> str | None:
    return available_kernels()[name].machine_problem()


def choose(layout: GridLayout, device_type: str, dtype: Any, wanted: str = AUTO) -> tuple[Kernel | None, str]:
    """The kernel that runs grids of ``layout`` on ``device_type`` with ``dtype`` activations (the
    highest priority of those that take it; ``wanted``: only that one), or None and why not."""
    table = available_kernels()
    if wanted not in (AUTO, NONE, REQUIRED) and wanted not in table:
        raise PluginError(f"unknown kernel {wanted!r}; installed: {', '.join(sorted(table)) or 'none'}")
    candidates = [table[wanted]] if wanted != AUTO else sorted(table.values(), key=lambda k: -k.priority)
    dtype_name = str(dtype).removeprefix("torch.")
    reasons = []
    for kernel in candidates:
        why = _refusal(kernel, layout, device_type, dtype_name)
        if why is None:
            return kernel, kernel.name
        reasons.append(f"{kernel.name}: {why}")
    return None, "; ".join(reasons) or "no kernel is installed"


def choose_kernel(layout: GridLayout, device_type: str, dtype: Any) -> tuple[Kernel | None, str]:
    """The registered kernel that would run integer-grid weights of ``layout`` on ``device_type``
    with ``dtype`` activations, and its name; or None and why none takes it. For a plugin whose
    layer adds arithmetic around the matmul (quantplug-bitnet's int8 activations) and so runs a
    kernel itself: ``kernel.build(grid, dtype)`` gives the weights (``Kernel``'s contract)."""
    return choose(layout, device_type, dtype)


def _refusal(kernel: Kernel, layout: GridLayout, device_type: str, dtype_name: str) -> str | None:
    if kernel.device_type != device_type:
        return f"runs on {kernel.device_type}, the layer is on {device_type}"
    if dtype_name not in kernel.dtypes:
        return f"runs {' / '.join(kernel.dtypes)} activations, the model is {dtype_name}"
    return _machine_problem(kernel.name) or kernel.layout_problem(layout)
