"""``QuantplugHfQuantizer``: runs one quantplug backend inside Transformers' ``from_pretrained``.

The bridge (``quantplug.integrations.transformers``) makes one subclass per bridged backend and
sets its ``config_class`` (the matching ``QuantplugHfConfig`` subclass) and ``rebuild`` (how pickle
remakes it). Like every other path, it puts the backend's modules in through the one layer walk
(``quantplug.walk.LayerWalk``), so a model quantized or loaded either way is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from ..backend import Quantizer
from ..checkpoint import header_metadata
from ..config import QuantConfig
from ..dispatch import AutoQuantizer
from ..errors import CheckpointError, ConfigError, PluginError
from ..experts_contract import site_empty, site_expected, site_load, site_quantize
from ..layers import dotted_prefixes, owner_of
from ..walk import LayerWalk, quantized_info

logger = logging.getLogger("quantplug.integrations.transformers")


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


def _stored_keys(files: Any) -> set[str] | None:
    """The tensor names of the safetensors files Transformers is about to load (headers only), so
    MoE experts are unfused under the names the checkpoint gives them (``quantplug.sites``)."""
    from ..safetensors_header import read_header

    paths = [f for f in files or () if str(f).endswith(".safetensors")]
    return {k for f in paths for k in read_header(f).entries} if paths else None


class QuantplugHfQuantizer(HfQuantizer):
    """Runs one quantplug backend inside ``from_pretrained``. Each bridged backend gets a subclass.

    - Not pre-quantized (``quantization_config=`` on a full-precision checkpoint): after the weights
      load, the planned modules are replaced by ``quantizer.quantize_module`` (as ``quantplug.quantize``).
    - Pre-quantized (``config.json`` names the backend): before the weights load, the planned modules
      become ``quantizer.empty_module`` (meta tensors) and Transformers' loader fills them; integer
      tensors keep their dtype (``HfQuantizer.get_new_dtype`` casts floating ones only).
    """

    quant_method: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)
    """The ``QuantplugHfConfig`` subclass of this backend (set by the bridge)."""
    rebuild: ClassVar[Callable[..., Any] | None] = None
    """``rebuild(quantplug_config, pre_quantized)`` remakes an instance (for pickle; set by the bridge)."""
    requires_calibration = False

    def __init__(self, quantization_config: Any, **kwargs: Any):
        # A quantplug config (or dict) passed straight to from_pretrained arrives here as it is.
        got = (
            quantization_config.get("quant_method")
            if isinstance(quantization_config, dict)
            else getattr(quantization_config, "quant_method", None)
        )
        if got is not None and got != self.quant_method:
            raise ConfigError(
                f"{type(self).__name__} runs quant_method {self.quant_method!r}, got a config for {got!r}",
                field="quant_method",
                value=got,
                allowed=self.quant_method,
            )
        if not isinstance(quantization_config, self.config_class):
            quantization_config = self.config_class(quantization_config)
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
        self.walk: LayerWalk | None = None
        self._metas: dict[str, nn.Linear] = {}
        self._requires_grad: dict[str, dict[str, bool]] = {}

    @property
    def qconfig(self) -> QuantConfig:
        return self.quantization_config.quantplug_config

    @property
    def modules_to_quantize(self) -> list[str]:
        return list(self.walk.names) if self.walk is not None else []

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
        self.walk = LayerWalk(model, self.quantizer, _stored_keys(kwargs.get("checkpoint_files")))
        self._metas = self.walk.meta_linears()
        direct = _uses_state_dict_layout(self.quantizer)

        def empty(name: str, module: nn.Module) -> nn.Module:
            new = site_empty(self.walk, name, self._metas[name])
            self._requires_grad[name] = {k: p.requires_grad for k, p in new.named_parameters()}
            return new if direct else _TensorHolder(self._holder_spec(name, self._metas[name], new))

        self.walk.replace(empty)
        _untie(model, self.walk.names)
        _skip_init(model, self.walk.names)
        return model

    def update_weight_conversions(self, weight_conversions, model):
        """The model's conversion mapping without the converters that stack per-expert weights into
        experts modules the walk unfused (their per-expert tensors load by their own names, after
        the renamings): left in, they would take a per-expert ``weight`` away to a stacked
        parameter that no longer exists."""
        from transformers.core_model_loading import WeightConverter

        from ..experts import is_unfused

        unfused = [n for n, m in model.named_modules() if is_unfused(m)]
        if unfused:
            params = [n for n, _ in model.named_parameters()]

            def stacks_into_unfused(c) -> bool:
                if not isinstance(c, WeightConverter):
                    return False
                targets = [t.strip(".") for t in c._original_target_patterns]
                stacked = [t for t in targets if ".experts." in f".{t}"]
                return bool(stacked) and not any(p.endswith(t) for t in stacked for p in params)

            weight_conversions = [c for c in weight_conversions if not stacks_into_unfused(c)]
        return super().update_weight_conversions(weight_conversions, model)

    def _holder_spec(
        self, name: str, meta: nn.Linear, empty: nn.Module
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        fallback = empty.state_dict()
        spec = {}
        for key, (shape, dtype) in site_expected(self.walk, name, meta).items():
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
                self.walk.replace(self._loaded)
            else:
                self.walk = LayerWalk(model, self.quantizer)
                # device_map="auto" and the like were resolved only now
                for device in {model.get_submodule(n).weight.device for n in self.walk.names}:
                    self.quantizer.validate_environment(device)
                self.walk.replace(lambda name, m: site_quantize(self.walk, name, m))
                _untie(model, self.walk.names)
        self.walk.finish()
        return model

    def _loaded(self, name: str, module: nn.Module) -> nn.Module:
        """A pre-quantized layer once Transformers has loaded its tensors: rebuilt through
        ``load_module`` when they were held for it, with the backend's ``requires_grad`` kept
        (Transformers' loader makes loaded floating tensors trainable)."""
        if isinstance(module, _TensorHolder):
            tensors = module.tensors()
            missing = sorted(k for k, t in tensors.items() if t.device.type == "meta")
            if missing:
                raise CheckpointError(
                    f"tensors {', '.join(f'{name}.{k}' for k in missing)} were not loaded: missing "
                    f"from the checkpoint, or offloaded to disk, which backend {self.quant_method!r} "
                    f"cannot load through Transformers (use a device_map without 'disk')"
                )
            module = site_load(self.walk, name, self._metas[name], tensors)
        wanted = self._requires_grad.get(name, {})
        for key, param in module.named_parameters():
            if key in wanted:
                param.requires_grad_(wanted[key])
        return module

    def get_state_dict_and_metadata(self, model):
        info = quantized_info(model)
        metadata = {k: v for k, v in header_metadata(info).items() if k != "format"}
        if info is None or _uses_state_dict_layout(info.quantizer):
            return None, metadata
        # The backend stores other tensors than its modules' state_dict: write quantplug.save's layout.
        quantized, done = set(info.modules), set()
        state_dict: dict[str, torch.Tensor] = {}
        for key, tensor in model.state_dict().items():
            owner = owner_of(key, quantized)
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
        return type(self).rebuild, (self.quantization_config.quantplug_config, self.pre_quantized)


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
            if any(
                p in quantized for p in (*dotted_prefixes(base + target), *dotted_prefixes(base + source))
            ):
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
