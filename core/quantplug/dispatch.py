"""Dispatch: ``quant_method`` -> the backend that owns it. ``backends()``, ``get_backend(name)``
(with an error that says what to install), ``config_from_dict`` / ``as_config`` (a config dict
validated by its backend's config class) and ``AutoQuantizer.from_config`` (the backend's
``Quantizer`` for a config). The registered backends come from ``quantplug.discovery``."""

from __future__ import annotations

from typing import Any

from .backend import Backend, Quantizer
from .config import QuantConfig
from .discovery import registry
from .errors import AmbiguousBackendError, ConfigError, UnknownMethodError
from .hints import PLUGIN_FOR_METHOD, install_hint
from .plugin_env import norm
from .plugin_problems import ambiguity_message


def backends() -> list[Backend]:
    """Every registered backend, sorted by name, available or not (see ``Backend.available``)."""
    return list(registry().sorted_backends())


def get_backend(name: str) -> Backend:
    """The backend that owns ``quant_method`` ``name``; ``UnknownMethodError`` says what to install,
    ``AmbiguousBackendError`` (one) how to choose between plugins that all register ``name``."""
    reg = registry()
    if not isinstance(name, str):
        raise UnknownMethodError(f"quant_method must be a string, got {name!r}", method=str(name))
    backend = reg.backends.get(name)
    if backend is not None:
        return backend
    if name in reg.ambiguous:
        raise AmbiguousBackendError(ambiguity_message(name, reg.ambiguous[name]), method=name)
    installed = ", ".join(sorted(reg.backends)) or "none"
    parts = [f"No installed backend owns quant_method {name!r} (installed backends: {installed})."]
    near = [b for b in reg.backends if norm(b) == norm(name)]
    if near:  # installed under another spelling: installing would be the wrong advice
        parts.append(
            f"Did you mean {near[0]!r}? quant_method is matched exactly (as Transformers does): "
            f"write {near[0]!r}."
        )
        raise UnknownMethodError(" ".join(parts), method=name)
    disabled = [p.name for p in reg.plugins.values() if p.status == "disabled"]
    if disabled:
        parts.append(
            f"Disabled by QUANTPLUG_PLUGINS / QUANTPLUG_DISABLE_PLUGINS: {', '.join(sorted(disabled))}."
        )
    provider = PLUGIN_FOR_METHOD.get(name.strip().lower())
    owner = next(
        (
            p
            for p in reg.plugins.values()
            if p.status == "disabled" and p.dist and provider and norm(p.dist) == provider
        ),
        None,
    )
    if owner is not None:  # installed, so "pip install" would be the wrong advice
        action = (
            f"remove {owner.name} from QUANTPLUG_DISABLE_PLUGINS"
            if "QUANTPLUG_DISABLE_PLUGINS" in (owner.error or "")
            else f"add {owner.name} to QUANTPLUG_PLUGINS"
        )
        parts.append(
            f"quant_method {name!r} is provided by {owner.dist}, which is installed but {owner.error}: "
            f"{action} to use it."
        )
    else:
        parts.append(install_hint(name) + ".")
    if reg.problems:
        parts.append(f"{len(reg.problems)} plugin problem(s) were recorded: run `quantplug doctor`.")
    raise UnknownMethodError(" ".join(parts), method=name)


def config_from_dict(data: dict[str, Any], *, from_checkpoint: bool = False) -> QuantConfig:
    """Validate a config dict into the owning backend's config class. Light: imports no backend
    library. ``from_checkpoint=True`` for a checkpoint's ``quantization_config``: keys the config
    does not know are kept (``QuantConfig.from_checkpoint``) instead of refused."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"a quantization config must be a dict, got {type(data).__name__}", value=data, allowed="a dict"
        )
    if "quant_method" not in data:
        raise ConfigError(
            "the quantization config has no 'quant_method' key; add one "
            f"(installed backends: {', '.join(sorted(registry().backends)) or 'none'})",
            field="quant_method",
            value=None,
            allowed=sorted(registry().backends),
        )
    method = data["quant_method"]
    if not isinstance(method, str):
        raise ConfigError(
            f"quant_method must be a string, got {method!r}",
            field="quant_method",
            value=method,
            allowed=sorted(registry().backends),
        )
    config_class = get_backend(method).config
    return config_class.from_checkpoint(data) if from_checkpoint else config_class.from_dict(data)


def as_config(config: QuantConfig | dict[str, Any]) -> QuantConfig:
    """``config`` itself, or the config a dict describes (validated by its backend's config class)."""
    if isinstance(config, dict):
        return config_from_dict(config)
    if not isinstance(config, QuantConfig):
        raise ConfigError(
            f"expected a quantplug QuantConfig or a dict, got {type(config).__name__}",
            value=config,
            allowed="a QuantConfig or a dict with quant_method",
        )
    return config


class AutoQuantizer:
    """Dispatch a config to the ``Quantizer`` of the plugin that owns its ``quant_method``."""

    @staticmethod
    def from_config(config: QuantConfig | dict[str, Any]) -> Quantizer:
        config = as_config(config)
        backend = get_backend(config.quant_method)
        if not isinstance(config, backend.config):
            raise ConfigError(
                f"config {type(config).__name__} has quant_method {config.quant_method!r}, but that backend "
                f"(from {backend.plugin}) expects {backend.config.__name__}",
                field="quant_method",
                value=config.quant_method,
                allowed=backend.config.__name__,
            )
        quantizer = backend.quantizer_class()(backend, config)
        quantizer.check_config()
        return quantizer
