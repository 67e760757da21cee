"""Devices and model inputs: where a model lives, moving inputs there, and running a model on one
batch of inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first non-meta parameter (CPU when it has none)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Model inputs on ``device``: a tensor, or a mapping of keyword arguments whose tensor values
    are moved (other values are kept). Anything else is a ``ConfigError``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    raise ConfigError(
        f"model inputs must be a tensor or a dict of keyword arguments, got {type(inputs).__name__}",
        field="inputs",
        value=type(inputs).__name__,
        allowed="a tensor or a dict of tensors",
    )


def run_batch(model: nn.Module, inputs: Any, **kwargs: Any) -> Any:
    """``model`` on one batch of inputs, by quantplug's convention for model inputs (calibration
    data, ``compare``'s inputs): a tensor is the first argument, a mapping the keyword arguments.
    Floating-point input tensors are cast to the model's floating-point dtype (``compare`` runs
    the same inputs through a float32 and a bfloat16 model); integer ones (token ids) are not."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)

    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and dtype is not None and v.dtype != dtype:
            return v.to(dtype)
        return v

    if isinstance(inputs, Mapping):
        return model(**{k: cast(v) for k, v in inputs.items()}, **kwargs)
    return model(cast(inputs), **kwargs)
