"""The Transformers bridge: quantplug backends usable from ``from_pretrained`` / ``save_pretrained``.

``register_with_transformers()`` gives every quantplug backend whose ``quant_method`` Transformers
does not implement itself a ``QuantizationConfigMixin`` subclass and an ``HfQuantizer`` subclass,
registered with Transformers' ``register_quantization_config`` / ``register_quantizer``. Methods
Transformers knows (its roster) keep Transformers' own path. Afterwards::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=RtnConfig(bits=4))
    model.save_pretrained(out)                  # quantplug's checkpoint layout and config.json
    AutoModelForCausalLM.from_pretrained(out)   # ... and quantplug.load(out) both load it

The bridge owns no quantization logic: it runs the core's ``plan`` (which modules, which skips),
the backend's ``quantize_module`` / ``empty_module`` / ``load_module`` / ``module_tensors``, and
attaches ``QuantizedModelInfo``, exactly as ``quantplug.quantize`` / ``save`` / ``load`` do, so a
model quantized either way is the same and the checkpoints are interchangeable.

Transformers (5.24) offers no plugin or entry-point hook that runs on ``import transformers``, so
registration is explicit; the core also calls it whenever it quantizes or loads a model while
Transformers' quantizer registry is already imported (then it costs microseconds). Importing this
module imports Transformers (seconds: Transformers imports its quantizer roster eagerly); nothing
in ``import quantplug`` imports it.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, ClassVar

import torch
from torch import nn

try:
    from transformers.quantizers import auto as _hf_auto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin, QuantizationMethod
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        f"the quantplug Transformers bridge needs transformers ({exc}): pip install 'quantplug[transformers]'"
    ) from exc

from ..backend import Quantizer
from ..config import QuantConfig
from ..dispatch import AutoQuantizer, as_config, backends, get_backend
from ..errors import CheckpointError, ConfigError, PluginError
from ..layers import as_linear, as_linear_meta, plan, set_submodule
from ..walk import INFO_ATTR, QuantizedModelInfo, attach_info

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
    quantplug_config: QuantConfig

    def __init__(self, quantplug_config: QuantConfig | dict[str, Any] | None = None, **kwargs: Any):
        method = type(self).quant_method
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
        config = cls(**config_dict)
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
            self.__dict__["quantplug_config"] = type(config).from_dict({**config.to_dict(), **changes})
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


# -- the quantizer ------------------------------------------------------------------------------


def _uses_state_dict_layout(quantizer: Quantizer) -> bool:
    """True when the backend's checkpoint tensors are its module's ``state_dict()`` (the default), so
    Transformers' loader can fill ``empty_module`` directly. Otherwise the bridge holds the tensors
    in a ``_TensorHolder`` while Transformers loads them, and rebuilds with ``load_module``."""
    cls = type(quantizer)
    return cls.module_tensors is Quantizer.module_tensors and cls.load_module is Quantizer.load_module


class _TensorHolder(nn.Module):
    """Stands in for a quantized module while Transformers loads its checkpoint tensors (keys and
    shapes from ``quantizer.expected_tensors``), for backends whose checkpoint layout is not their
    module's ``state_dict()``. Replaced through ``quantizer.load_module`` after loading."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        for key, (shape, dtype) in spec.items():
            owner: nn.Module = self
            *path, leaf = key.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, _TensorHolder({}))
                owner = owner._modules[part]
            owner.register_buffer(leaf, torch.empty(shape, dtype=dtype, device="meta"))

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this quantized module was never rebuilt from its checkpoint tensors")


class QuantplugHfQuantizer(HfQuantizer):
    """Runs one quantplug backend inside ``from_pretrained``. Each bridged backend gets a subclass.

    - Not pre-quantized (``quantization_config=`` on a full-precision checkpoint): after the weights
      load, the planned modules are replaced by ``quantizer.quantize_module`` (as ``quantplug.quantize``).
    - Pre-quantized (``config.json`` names the backend): before the weights load, the planned modules
      become ``quantizer.empty_module`` (meta tensors) and Transformers' loader fills them; integer
      tensors keep their dtype (``HfQuantizer.get_new_dtype`` casts floating ones only).
    """

    quant_method: ClassVar[str] = ""
    requires_calibration = False

    def __init__(self, quantization_config: QuantplugHfConfig | QuantConfig | dict[str, Any], **kwargs: Any):
        # A quantplug config passed straight to from_pretrained arrives here as it is.
        quantization_config = to_transformers(quantization_config)
        if quantization_config.quant_method != self.quant_method:
            raise ConfigError(
                f"{type(self).__name__} runs quant_method {self.quant_method!r}, got a config for "
                f"{quantization_config.quant_method!r}",
                field="quant_method",
                value=quantization_config.quant_method,
                allowed=self.quant_method,
            )
        super().__init__(quantization_config, **kwargs)
        self.quantizer = AutoQuantizer.from_config(quantization_config.quantplug_config)
        if not self.pre_quantized and self.quantizer.needs_calibration():
            raise ConfigError(
                f"this {self.quant_method!r} config needs calibration data, which from_pretrained cannot give it: "
                f"quantize with quantplug (calibrating), save with quantplug.save or save_pretrained, then load that",
                field="quant_method",
                value=self.quant_method,
                allowed="a backend without calibration",
            )
        self.modules_to_quantize: list[str] = []
        self._linears: dict[str, nn.Linear] = {}
        self._requires_grad: dict[str, dict[str, bool]] = {}

    @property
    def qconfig(self) -> QuantConfig:
        return self.quantization_config.quantplug_config

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        for device in _devices(device_map):
            self.quantizer.validate_environment(device)

    def update_attn_implementation(self, config):
        # Transformers stores a config passed to from_pretrained on the model config as it is; store
        # the Transformers view instead, so config.json and Transformers' own code see a mixin.
        if isinstance(getattr(config, "quantization_config", None), QuantConfig):
            config.quantization_config = self.quantization_config
        return config

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        model.config.quantization_config = self.quantization_config
        if not self.pre_quantized:
            return model
        self.modules_to_quantize, _ = plan(model, self.qconfig, self.quantizer)
        direct = _uses_state_dict_layout(self.quantizer)
        for name in self.modules_to_quantize:
            meta = as_linear_meta(model.get_submodule(name))
            new = self.quantizer.empty_module(name, meta)
            self._requires_grad[name] = {k: p.requires_grad for k, p in new.named_parameters()}
            if not direct:
                new = _TensorHolder(self._holder_spec(name, meta, new))
                self._linears[name] = meta
            set_submodule(model, name, new)
        _untie(model, self.modules_to_quantize)
        _skip_init(model, self.modules_to_quantize)
        return model

    def _holder_spec(
        self, name: str, meta: nn.Linear, empty: nn.Module
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        fallback = empty.state_dict()
        spec = {}
        for key, (shape, dtype) in self.quantizer.expected_tensors(name, meta).items():
            if shape is None or dtype is None:
                if key not in fallback:
                    raise PluginError(
                        f"backend {self.quant_method!r}: expected_tensors gives no shape/dtype for {name}.{key}; "
                        f"loading through Transformers needs both (report this to the plugin's maintainers)"
                    )
                shape = tuple(fallback[key].shape) if shape is None else shape
                dtype = fallback[key].dtype if dtype is None else dtype
            spec[key] = (tuple(shape), dtype)
        return spec

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        with torch.no_grad():
            if self.pre_quantized:
                for name in self.modules_to_quantize:
                    module = model.get_submodule(name)
                    if isinstance(module, _TensorHolder):
                        tensors = module.tensors()
                        missing = sorted(k for k, t in tensors.items() if t.device.type == "meta")
                        if missing:
                            raise CheckpointError(
                                f"tensors {', '.join(f'{name}.{k}' for k in missing)} were not loaded: missing "
                                f"from the checkpoint, or offloaded to disk, which backend {self.quant_method!r} "
                                f"cannot load through Transformers (use a device_map without 'disk')"
                            )
                        module = self.quantizer.load_module(name, self._linears.pop(name), tensors)
                        set_submodule(model, name, module)
                    # Transformers' loader makes loaded floating tensors trainable; keep the backend's choice.
                    wanted = self._requires_grad.get(name, {})
                    for key, param in module.named_parameters():
                        if key in wanted:
                            param.requires_grad_(wanted[key])
            else:
                self.modules_to_quantize, _ = plan(model, self.qconfig, self.quantizer)
                # device_map="auto" and the like were resolved only now
                for device in {model.get_submodule(n).weight.device for n in self.modules_to_quantize}:
                    self.quantizer.validate_environment(device)
                for name in self.modules_to_quantize:
                    linear = as_linear(model.get_submodule(name))
                    set_submodule(model, name, self.quantizer.quantize_module(name, linear))
                _untie(model, self.modules_to_quantize)
        attach_info(model, QuantizedModelInfo(self.qconfig, self.quantizer, list(self.modules_to_quantize)))
        return model

    def get_state_dict_and_metadata(self, model):
        from ..checkpoint import header_metadata

        info: QuantizedModelInfo | None = getattr(model, INFO_ATTR, None)
        metadata = {k: v for k, v in header_metadata(info).items() if k != "format"}
        if info is None or _uses_state_dict_layout(info.quantizer):
            return None, metadata
        # The backend stores other tensors than its modules' state_dict: write quantplug.save's layout.
        quantized, done = set(info.modules), set()
        state_dict: dict[str, torch.Tensor] = {}
        for key, tensor in model.state_dict().items():
            owner = next((p for p in _prefixes(key) if p in quantized), None)
            if owner is None:
                state_dict[key] = tensor
            elif owner not in done:
                done.add(owner)
                for k, t in info.quantizer.module_tensors(owner, model.get_submodule(owner)).items():
                    state_dict[f"{owner}.{k}"] = t
        return state_dict, metadata

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        ok = self.quantizer.backend.capabilities.serializable
        if not ok:
            logger.warning("backend %r declares that its quantized models cannot be saved", self.quant_method)
        return ok

    @property
    def is_trainable(self) -> bool:
        return self.quantizer.backend.capabilities.trainable

    def __reduce__(self):
        return _rebuild_quantizer, (self.quantization_config.quantplug_config, self.pre_quantized)


def _rebuild_quantizer(config: QuantConfig, pre_quantized: bool) -> QuantplugHfQuantizer:
    to_transformers(config)
    return _bridged[config.quant_method][1](config, pre_quantized=pre_quantized)


def _untie(model: nn.Module, names: list[str]) -> None:
    """Drop Transformers' weight ties that involve a quantized module (e.g. a tied ``lm_head`` quantized
    with ``modules_to_not_convert=[]``): it has no ``weight`` left to tie, and tying would fail."""
    quantized = set(names)
    for prefix, module in model.named_modules():
        tied = getattr(module, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        base = f"{prefix}." if prefix else ""
        for target, source in list(tied.items()):
            if any(p in quantized for p in (*_prefixes(base + target), *_prefixes(base + source))):
                del tied[target]


def _skip_init(model: nn.Module, names: list[str]) -> None:
    """Keep Transformers' weight initialization (run after loading, for missing keys) away from the
    quantized modules, whose tensors all come from the checkpoint: some models' ``_init_weights``
    reach into a child's ``.weight`` (GPT-2: ``attn.c_proj.weight``), which a quantized module lacks.
    A parent is skipped only when it holds no tensors of its own."""
    for name in names:
        module = model.get_submodule(name)
        module._is_hf_initialized = True
        parent = model.get_submodule(name.rpartition(".")[0])
        if not any(True for _ in parent.parameters(recurse=False)) and not any(
            True for _ in parent.buffers(recurse=False)
        ):
            parent._is_hf_initialized = True


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _devices(device_map: Any) -> list[torch.device]:
    """The torch devices a ``from_pretrained`` ``device_map`` names (none for "auto" and the like)."""
    if device_map is None:
        return [torch.device("cpu")]
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    out = []
    for value in values:
        if value == "disk":  # offloaded weights are loaded to the CPU when used
            value = "cpu"
        try:
            device = value if isinstance(value, torch.device) else torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            continue  # "auto", "balanced", ...: Transformers resolves them later
        if device not in out:
            out.append(device)
    return out


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
        {"quant_method": method, "__module__": __name__},
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
