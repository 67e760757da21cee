"""``quantize``: quantize a model in place with the backend that owns the config's
``quant_method``, through the one layer walk (``quantplug.walk``), with calibration where the
config needs it, and a report of what changed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .devices import model_device, to_device
from .dispatch import AutoQuantizer
from .errors import AlreadyQuantizedError, ConfigError
from .experts import all_experts_see_all_tokens
from .experts_contract import site_quantize, site_tensors
from .integrations import register_if_transformers_loaded
from .kernel_layer import apply_kernels, float_dtype_of, summary
from .layers import tensor_bytes
from .walk import LayerWalk, quantized_info, release_freed_memory

__all__ = ["QuantizeReport", "calibration_batches", "quantize"]


@dataclasses.dataclass
class QuantizeReport:
    """What ``quantize`` did."""

    backend: str
    config: dict[str, Any]
    converted: list[str]
    skipped: dict[str, str]
    bytes_before: int
    bytes_after: int
    seconds: float
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    """Each converted layer's kernel, or why it runs the backend's own module (``quantplug.kernels``)."""

    def __str__(self) -> str:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        lines = [
            f"quantplug: {self.backend}: converted {len(self.converted)} module(s), skipped {len(self.skipped)}, "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x) "
            f"in {self.seconds:.1f} s"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  {n} layer(s) run: {how}" for how, n in summary(self.kernels).items()]
        return "\n".join(lines)


def calibration_batches(
    quantizer: Any, calibration_data: Iterable[Any] | None, device: torch.device
) -> list[Any] | None:
    """``calibration_data`` as a list of batches on ``device``, checked against what the config
    needs: a config that needs calibration without data, data for a config that takes none, an
    empty iterable and a batch that is neither a tensor nor a mapping are ``ConfigError``s."""
    config = quantizer.config
    needed = quantizer.needs_calibration()
    if calibration_data is None:
        if needed:
            raise ConfigError(
                f"{type(config).__name__} ({config.quant_method}) needs calibration data: pass "
                f"calibration_data= to quantplug.quantize (an iterable of model inputs: token-id tensors "
                f"or dicts of tensors, e.g. a few hundred tokens of representative text)",
                field="calibration_data",
                value=None,
                allowed="an iterable of model inputs",
            )
        return None
    if not needed:
        raise ConfigError(
            f"{type(config).__name__} ({config.quant_method}) takes no calibration data; "
            f"drop calibration_data= (or choose a config that calibrates)",
            field="calibration_data",
            value=type(calibration_data).__name__,
            allowed="None for this config",
        )
    if isinstance(calibration_data, (torch.Tensor, Mapping, str, bytes)):
        raise ConfigError(
            "calibration_data must be an iterable of batches (e.g. [ids1, ids2] or [{'input_ids': ids}]), "
            f"not a single {type(calibration_data).__name__}; wrap one batch in a list",
            field="calibration_data",
            value=type(calibration_data).__name__,
            allowed="an iterable of tensors or dicts of tensors",
        )
    batches = []
    for i, batch in enumerate(calibration_data):
        if not isinstance(batch, (torch.Tensor, Mapping)):
            raise ConfigError(
                f"calibration_data batch {i} is a {type(batch).__name__}; each batch must be a tensor "
                f"(passed as the model's first argument) or a dict of model keyword arguments",
                field="calibration_data",
                value=type(batch).__name__,
                allowed="tensors or dicts of tensors",
            )
        batches.append(to_device(batch, device))
    if not batches:
        raise ConfigError(
            "calibration_data is empty; pass at least one batch of model inputs",
            field="calibration_data",
            value=[],
            allowed="a non-empty iterable of model inputs",
        )
    return batches


def quantize(
    model: nn.Module,
    config: QuantConfig | dict[str, Any],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    calibration_data: Iterable[Any] | None = None,
    kernel: str | None = None,
) -> QuantizeReport:
    """Quantize ``model`` in place with the backend that owns ``config.quant_method``.

    Eligible layers (``nn.Linear``, Transformers' ``Conv1D``) are replaced by the backend's modules,
    except ``modules_to_not_convert`` and, by default, the output head and tied layers. Each layer
    is moved to ``device`` (default: where the model's parameters are) before it is quantized.
    ``calibration_data`` is an iterable of model inputs (tensors, e.g. token ids, or dicts of
    tensors passed as keyword arguments), required by configs that need calibration (activation
    quantization, GPTQ-style methods) and refused by those that do not: after every layer is
    replaced, the quantizer's ``calibrate(model, batches)`` runs them through the model.
    ``kernel``: as ``quantplug.load``'s (``"auto"``: integer-grid layers run the fastest kernel
    that takes them, e.g. torch's fused int4 / int8 CPU kernels in a bfloat16 model; ``"none"``).
    Returns a ``QuantizeReport``; the model keeps working (``forward``, ``generate``).
    """
    t0 = time.perf_counter()
    quantizer = AutoQuantizer.from_config(config)
    config = quantizer.config
    done = quantized_info(model)
    if done is not None:
        raise AlreadyQuantizedError(
            f"this model is already quantized with {done.config.quant_method!r}; quantize a fresh full-precision model instead",
            field="quant_method",
            value=config.quant_method,
            allowed="a model quantplug has not quantized yet",
        )
    target = torch.device(device) if device is not None else model_device(model)
    quantizer.validate_environment(target)
    batches = calibration_batches(quantizer, calibration_data, target)
    dtype = float_dtype_of(model)  # (before: a model of quantized layers only has no float parameters after)
    walk = LayerWalk(model, quantizer)
    with torch.no_grad():
        before = walk.replace(
            lambda name, module: site_quantize(walk, name, module.to(target)),
            desc=f"quantizing ({config.quant_method})",
            progress=progress,
        )
    if any(t.device.type != target.type for t in [*model.parameters(), *model.buffers()]):
        model.to(target)  # the layers left in full precision follow the quantized ones
    if batches is not None:
        with torch.no_grad(), all_experts_see_all_tokens(model):
            quantizer.calibrate(model, batches)
        release_freed_memory()
    # Measured after calibration: a quantizer may finish its layers there.
    names = walk.names
    native = walk.native_experts
    after = sum(
        tensor_bytes(site_tensors(quantizer, n, model.get_submodule(n), native).values()) for n in names
    )
    info = walk.finish()
    apply_kernels(model, info, kernel, dtype)
    register_if_transformers_loaded()
    return QuantizeReport(
        backend=config.quant_method,
        config=config.to_dict(),
        converted=names,
        skipped=walk.skipped,
        bytes_before=before,
        bytes_after=after,
        seconds=time.perf_counter() - t0,
        kernels=dict(info.kernels),
    )
