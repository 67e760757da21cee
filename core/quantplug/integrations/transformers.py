"""The Transformers bridge: quantplug backends usable from ``from_pretrained`` / ``save_pretrained``.

``register_with_transformers()`` gives every quantplug backend whose ``quant_method`` Transformers
does not implement itself a ``QuantizationConfigMixin`` subclass and an ``HfQuantizer`` subclass,
registered with Transformers' ``register_quantization_config`` / ``register_quantizer``. Methods
Transformers knows (its roster) keep Transformers' own path. Afterwards::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=RtnConfig(bits=4))
    model.save_pretrained(out)                  # quantplug's checkpoint layout and config.json
    AutoModelForCausalLM.from_pretrained(out)   # ... and quantplug.load(out) both load it

The bridge owns no quantization logic: its ``HfQuantizer`` (``hf_quantizer.QuantplugHfQuantizer``)
runs the core's one layer walk (``quantplug.walk.LayerWalk``: the plan, the backend's
``quantize_module`` / ``empty_module`` / ``load_module``, ``QuantizedModelInfo``) exactly as
``quantplug.quantize`` / ``load`` do, and writes ``quantplug.save``'s tensors, so a model quantized
either way is the same and the checkpoints are interchangeable. This module holds the config view
(``QuantplugHfConfig``) and the registration.

Transformers (5.24) offers no plugin or entry-point hook that runs on ``import transformers``.
quantplug's start-up hook (``_quantplug_hook``, see ``quantplug.integrations.guard``) registers
the bridge when ``from_pretrained`` meets a checkpoint whose method a quantplug backend provides;
otherwise call ``register_with_transformers()``. ``quantplug.quantize`` and ``quantplug.load``
call it as their last step when Transformers' quantizer registry is already imported
(``quantplug.integrations.register_if_transformers_loaded``; then it costs microseconds). Importing this
module imports Transformers (seconds: Transformers imports its quantizer roster eagerly); nothing
in ``import quantplug`` imports it.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, ClassVar

try:
    from transformers.quantizers import auto as _hf_auto
    from transformers.utils.quantization_config import QuantizationConfigMixin, QuantizationMethod
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        f"the quantplug Transformers bridge needs transformers ({exc}): pip install 'quantplug[transformers]'"
    ) from exc

import _quantplug_hook

from ..config import QuantConfig
from ..dispatch import as_config, backends, get_backend
from ..errors import ConfigError
from .hf_quantizer import QuantplugHfQuantizer

__all__ = [
    "QuantplugHfConfig",
    "QuantplugHfQuantizer",
    "bridged_methods",
    "register_with_transformers",
    "to_transformers",
    "transformers_methods",
]

logger = logging.getLogger(__name__)

_lock = threading.RLock()
#: quant_method -> (config class, quantizer class) this bridge registered with Transformers
_bridged: dict[str, tuple[type[QuantplugHfConfig], type[QuantplugHfQuantizer]]] = {}


# -- the config ---------------------------------------------------------------------------------


class QuantplugHfConfig(QuantizationConfigMixin):
    """Transformers' view of a quantplug config: ``from_pretrained(..., quantization_config=...)``
    accepts it, and ``config.json`` holds exactly quantplug's ``to_dict()``.

    Each bridged backend gets a subclass with its ``quant_method``, named like the backend's config
    class (Transformers compares class names when a config is passed for a pre-quantized
    checkpoint). Build one with ``to_transformers(quantplug_config)``, or from keyword arguments as
    Transformers does from ``config.json``: they are validated by the backend's config class
    (``ConfigError`` on bad values). The config's fields read as attributes (``cfg.bits``);
    setting one (or ``update(...)``) builds a new, validated quantplug config.
    """

    quant_method: ClassVar[str] = ""
    backend_method: ClassVar[str] = ""
    """The quantplug backend's ``quant_method`` when Transformers finds this class under another
    name (a checkpoint ``integrations.guard`` routes to the bridge); empty: ``quant_method``."""
    quantplug_config: QuantConfig

    def __init__(self, quantplug_config: QuantConfig | dict[str, Any] | None = None, **kwargs: Any):
        method = type(self).backend_method or type(self).quant_method
        if not method:
            raise TypeError(
                "QuantplugHfConfig is a base class; use quantplug.integrations.transformers.to_transformers(config)"
            )
        if quantplug_config is None:
            config = get_backend(method).config.from_dict(kwargs)
        elif kwargs:
            raise TypeError(
                f"{type(self).__name__}: pass either a quantplug config or keyword arguments, not both"
            )
        elif isinstance(quantplug_config, dict):
            config = get_backend(method).config.from_dict(quantplug_config)
        else:
            config = quantplug_config
        _check_config(config, method)
        self.__dict__["quantplug_config"] = config

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        # Transformers calls this with config.json's quantization_config: keys other tools add are kept
        method = cls.backend_method or cls.quant_method
        config = cls(get_backend(method).config.from_checkpoint({**config_dict, "quant_method": method}))
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return self.quantplug_config.to_dict()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def _fields(self) -> set[str]:
        return set(self.quantplug_config.to_dict()) - {"quant_method"}

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Replace config fields (validated); returns the keyword arguments that are not fields."""
        changes = {k: v for k, v in kwargs.items() if k in self._fields()}
        if changes:
            config = self.quantplug_config
            # from_checkpoint: the config's kept keys (``extra``) stay; changes are only its own keys
            self.__dict__["quantplug_config"] = type(config).from_checkpoint({**config.to_dict(), **changes})
        return {k: v for k, v in kwargs.items() if k not in changes}

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: expose the quantplug config's fields.
        config = self.__dict__.get("quantplug_config")
        if config is not None and not name.startswith("_") and name in self._fields():
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if "quantplug_config" in self.__dict__ and name in self._fields():
            self.update(**{name: value})
        else:
            super().__setattr__(name, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantplugHfConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, like Transformers' configs

    def __reduce__(self):
        # The subclasses are made at runtime: pickle and deepcopy rebuild through the registry.
        return _rebuild_config, (self.quantplug_config,)


def _rebuild_config(config: QuantConfig) -> QuantplugHfConfig:
    return to_transformers(config)


def _check_config(config: Any, method: str) -> None:
    if not isinstance(config, QuantConfig):
        raise ConfigError(
            f"expected a quantplug QuantConfig for quant_method {method!r}, got {type(config).__name__}",
            value=config,
            allowed="a QuantConfig or a dict",
        )
    expected = get_backend(method).config
    if config.quant_method != method or not isinstance(config, expected):
        raise ConfigError(
            f"config {type(config).__name__} (quant_method {config.quant_method!r}) does not belong to backend "
            f"{method!r}, which expects {expected.__name__}",
            field="quant_method",
            value=config.quant_method,
            allowed=method,
        )


def _rebuild_quantizer(config: QuantConfig, pre_quantized: bool) -> QuantplugHfQuantizer:
    to_transformers(config)
    return _bridged[config.quant_method][1](config, pre_quantized=pre_quantized)


# -- registration -------------------------------------------------------------------------------


def _camel(method: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9a-zA-Z]+", method) if part)


def _make_classes(method: str) -> tuple[type[QuantplugHfConfig], type[QuantplugHfQuantizer]]:
    config_name = get_backend(method).config.__name__  # the same class name: from_pretrained compares names
    config_cls = type(config_name, (QuantplugHfConfig,), {"quant_method": method, "__module__": __name__})
    config_cls.__doc__ = (
        f"Transformers' view of quantplug backend {method!r}'s {config_name} (made by the bridge)."
    )
    quantizer_cls = type(
        f"{_camel(method)}QuantplugHfQuantizer",
        (QuantplugHfQuantizer,),
        {
            "quant_method": method,
            "config_class": config_cls,
            "rebuild": staticmethod(_rebuild_quantizer),
            "__module__": __name__,
        },
    )
    quantizer_cls.__doc__ = f"Runs quantplug backend {method!r} inside from_pretrained (made by the bridge)."
    return config_cls, quantizer_cls


def _is_ours(method: str) -> bool:
    pair = _bridged.get(method)
    return (
        pair is not None
        and _hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(method) is pair[0]
        and _hf_auto.AUTO_QUANTIZER_MAPPING.get(method) is pair[1]
    )


def transformers_methods() -> set[str]:
    """The ``quant_method`` names Transformers implements (or that others registered with it),
    not counting those this bridge registered."""
    names = {m.value for m in QuantizationMethod}
    names |= set(_hf_auto.AUTO_QUANTIZER_MAPPING) | set(_hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING)
    return {n for n in names if not _is_ours(n)}


def bridged_methods() -> list[str]:
    """The ``quant_method`` names this bridge has registered with Transformers, sorted."""
    with _lock:
        return sorted(m for m in _bridged if _is_ours(m))


def register_with_transformers() -> list[str]:
    """Register every quantplug backend that Transformers does not know with Transformers, so
    ``from_pretrained(..., quantization_config=cfg)`` and loading saved checkpoints work for it.

    Idempotent and thread-safe: returns the ``quant_method`` names registered by this call (empty
    when there was nothing new). Methods in Transformers' roster are left to Transformers. Call it
    again after registering more backends (``quantplug.register_backend`` / ``register_plugin``).
    Registrations are process-wide and last for the process (Transformers cannot unregister); a
    bridged name always dispatches to whichever backend owns it in quantplug's registry at the time.
    """
    with _lock:
        _quantplug_hook.guard(_hf_auto)  # for processes started with the start-up hook off
        known = transformers_methods()
        added = []
        for backend in backends():
            name = backend.name
            if _is_ours(name) or name in known:
                continue
            try:
                config_cls, quantizer_cls = _make_classes(name)
                _hf_auto.register_quantization_config(name)(config_cls)
                _hf_auto.register_quantizer(name)(quantizer_cls)
            except (
                TypeError,
                ValueError,
            ) as exc:  # e.g. registered with Transformers meanwhile by someone else
                logger.warning("quantplug: could not register backend %r with Transformers: %s", name, exc)
                continue
            _bridged[name] = (config_cls, quantizer_cls)
            added.append(name)
        return added


def to_transformers(config: QuantConfig | dict[str, Any] | QuantplugHfConfig) -> QuantplugHfConfig:
    """The Transformers config (a ``QuantizationConfigMixin``) wrapping a quantplug config, for
    ``from_pretrained(..., quantization_config=...)``. Registers the bridge as needed.

    ``from_pretrained`` also accepts the quantplug config itself once the bridge is registered.
    A method Transformers implements itself is refused: use Transformers' own config class for it.
    """
    if isinstance(config, QuantplugHfConfig):
        return config
    config = as_config(config)
    method = config.quant_method
    with _lock:
        if not _is_ours(method):
            register_with_transformers()
        if not _is_ours(method):
            get_backend(method)  # UnknownMethodError, saying what to install, when no backend owns it
            raise ConfigError(
                f"Transformers implements quant_method {method!r} itself, so the quantplug bridge leaves it to "
                f"Transformers: pass Transformers' own config class to from_pretrained, or use quantplug.load / "
                f"quantplug.quantize for the quantplug backend",
                field="quant_method",
                value=method,
                allowed=bridged_methods(),
            )
        config_cls = _bridged[method][0]
    return config_cls(config)
