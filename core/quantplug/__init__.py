"""quantplug: quantize PyTorch / Transformers models with any backend through one API.

Importing quantplug is light: torch and backend libraries are imported only when a model is
quantized, saved or loaded. Plugins use only the names exported here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .backend import Backend, BackendStatus, Quantizer
from .capabilities import Capabilities, Preset
from .config import QuantConfig
from .discovery import (
    plugins,
    problems,
    register_backend,
    register_plugin,
    reload_plugins,
    unregister_plugin,
)
from .dispatch import AutoQuantizer, backends, config_from_dict, get_backend
from .errors import (
    AlreadyQuantizedError,
    AmbiguousBackendError,
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    PluginError,
    QuantplugError,
    UnknownMethodError,
)
from .grid import Float8Grid, Float8Layout, GridLayout, IntegerGrid
from .hookspecs import hookimpl
from .kernel_base import Kernel
from .kernels import available_kernels, choose_kernel, register_kernel, unregister_kernel

__version__ = "0.1.0"

# Loaded on first attribute access: the heavy parts (they import torch), and select (light, but
# `quantplug list` and a plugin's import need none of it).
_LAZY = {
    "select": ".selection",
    "Selection": ".selection",
    "register_with_transformers": ".integrations.transformers",
    "to_transformers": ".integrations.transformers",
    "quantize": ".convert",
    "QuantizeReport": ".convert",
    "save": ".saving",
    "compare": ".comparison",
    "Comparison": ".comparison",
    "load": ".loading",
    "export": ".exporting",
    "run_batch": ".devices",
    "bench_presets": ".local_speed",
    "check_lora_targets": ".lora_check",
    "ExpertsLayout": ".experts",
    "UnfusedExperts": ".experts",
    "experts_layout": ".experts",
    "register_experts_class": ".experts",
    "route_top_k": ".experts",
    "KernelLinear": ".kernel_layer",
    "kernel_choices": ".kernel_layer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantplug' has no attribute {name!r}")


__all__ = [
    "AlreadyQuantizedError",
    "AmbiguousBackendError",
    "AutoQuantizer",
    "ExpertsLayout",
    "Backend",
    "BackendStatus",
    "BackendUnavailableError",
    "Capabilities",
    "CheckpointError",
    "ConfigError",
    "Float8Grid",
    "Float8Layout",
    "GridLayout",
    "IntegerGrid",
    "Kernel",
    "PluginError",
    "Preset",
    "QuantConfig",
    "Quantizer",
    "QuantplugError",
    "UnknownMethodError",
    "__version__",
    "available_kernels",
    "choose_kernel",
    "backends",
    "config_from_dict",
    "get_backend",
    "hookimpl",
    "plugins",
    "problems",
    "register_backend",
    "register_kernel",
    "register_plugin",
    "reload_plugins",
    "unregister_kernel",
    "unregister_plugin",
    *_LAZY,
]
