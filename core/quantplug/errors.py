"""The exceptions quantplug raises. Every message says what was wrong and what to do next."""

from __future__ import annotations

from typing import Any


class QuantplugError(Exception):
    """Base class of every error quantplug raises on purpose."""


class ConfigError(QuantplugError, ValueError):
    """A quantization config has an invalid value, an unknown key or an impossible combination.

    ``field`` names the offending key (``None`` for whole-config problems), ``value`` is what was
    given and ``allowed`` describes what would have been accepted.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None, allowed: Any = None):
        super().__init__(message)
        self.field = field
        self.value = value
        self.allowed = allowed


class AlreadyQuantizedError(ConfigError):
    """A model or checkpoint that is already quantized was given where a full-precision one is
    needed (``value`` is its ``quant_method``)."""


class UnknownMethodError(QuantplugError, LookupError):
    """No installed backend owns the requested ``quant_method``."""

    def __init__(self, message: str, *, method: str):
        super().__init__(message)
        self.method = method

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a KeyError
        return self.args[0]


class BackendUnavailableError(QuantplugError, RuntimeError):
    """A backend is registered but cannot run: its library is missing, too old or too new,
    its quantizer failed to import, or the requested device is not supported."""


class PluginError(QuantplugError):
    """A plugin broke the contract (bad descriptor, duplicate name, exception in a hook)."""


class CheckpointError(QuantplugError):
    """A checkpoint is missing, corrupt, or does not match what its config implies."""


class AmbiguousBackendError(UnknownMethodError, PluginError):
    """More than one installed plugin registers this ``quant_method``, so none is used; the
    message names them and how to choose one. An ``UnknownMethodError`` (no backend resolves the
    method: every caller that handles that handles this, e.g. ``load`` prefixes the config file)
    and a ``PluginError`` (plugins broke the rule that a backend name is unique)."""
