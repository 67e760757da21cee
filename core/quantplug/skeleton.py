"""The model skeleton a checkpoint is loaded into: its Transformers class built from config.json
with parameters on the meta device (no full-precision weights are allocated)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CONFIG_NAME, GENERATION_CONFIG_NAME
from .errors import CheckpointError

_register_parameter = nn.Module.register_parameter
_meta_init = threading.local()
_meta_lock = threading.Lock()
_meta_users = 0


def _register_parameter_maybe_on_meta(module, name, param):
    _register_parameter(module, name, param)
    if getattr(_meta_init, "active", False) and param is not None and param.device.type != "meta":
        p = module._parameters[name]
        module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (buffers stay real, so computed ones like rotary
    frequencies are right) — like accelerate's ``init_empty_weights(include_buffers=False)``.
    Only the calling thread is affected: models built meanwhile in other threads are normal."""
    global _meta_users
    with _meta_lock:
        if _meta_users == 0:
            nn.Module.register_parameter = _register_parameter_maybe_on_meta
        _meta_users += 1
    _meta_init.active = True
    try:
        yield
    finally:
        _meta_init.active = False
        with _meta_lock:
            _meta_users -= 1
            if _meta_users == 0:
                nn.Module.register_parameter = _register_parameter


def skeleton(
    folder: Path, config_json: dict, dtype: torch.dtype | None, stored_dtype: torch.dtype
) -> nn.Module:
    """The model class ``config.json``'s ``architectures`` names, built with parameters on the meta
    device in ``dtype`` (default: the config's, else ``stored_dtype``)."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{folder} needs Transformers to rebuild the model: pip install 'quantplug[transformers]', "
            f"or pass model= (an instance of the model class to fill)"
        ) from None
    archs = config_json.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: architectures={archs!r} names no Transformers model class; pass model="
        )
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # quantplug applies it; Transformers must not
    dtype = dtype or getattr(hf_config, "dtype", None) or stored_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _params_on_meta():
        model = cls._from_config(hf_config, dtype=dtype)
    if (folder / GENERATION_CONFIG_NAME).exists():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model
