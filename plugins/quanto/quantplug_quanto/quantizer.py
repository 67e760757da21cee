"""``QuantoQuantizer`` and ``QuantoLinear``: optimum-quanto's ``QLinear`` behind quantplug's API.

Each ``nn.Linear`` becomes a ``QuantoLinear`` (optimum-quanto's ``QLinear`` through its own
``from_module`` and ``freeze``; its kernels do the matmul). Activation configs are calibrated with
optimum-quanto's ``Calibration`` mode in ``calibrate`` (called by ``quantplug.quantize(...,
calibration_data=...)``).

Checkpoint tensors of one layer: optimum-quanto's own flattened state dict, so the layout is the
one its ``requantize`` reads:
    weight._data          int8 / float8_e4m3fn [out, in]        (int8, float8 weights)
    weight._data._data    uint8, packed 2 (int4) or 4 (int2) codes per byte, grouped rows
    weight._scale         float dtype [out, 1] or [groups, 1]
    weight._shift         float dtype [groups, 1]                (int4, int2)
    bias                  float dtype [out]                      (if the layer has one)
    input_scale, output_scale   float dtype []                   (activation scales; 1 when weight-only)
    quantize_output       bool []                                (activation configs only)
``quantize_output`` records whether calibration kept the layer's output quantized (optimum-quanto's
"streamline" drops it when only non-quantized ops consume the output); without it a reloaded model
would compute differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from optimum.quanto import Calibration, qfloat8, qint2, qint4, qint8
from optimum.quanto.nn import QLinear
from optimum.quanto.tensor.weights import WeightQBitsTensor
from torch import nn

import quantplug

from .config import QuantoConfig

QTYPES = {"int8": qint8, "int4": qint4, "int2": qint2, "float8": qfloat8}
OUTPUT_FLAG = "quantize_output"


class QuantoLinear(QLinear):
    """optimum-quanto's ``QLinear``, plus two things quantplug needs:

    - under ``torch.inference_mode()`` the call runs with inference mode off (and gradients off):
      quanto's packed int4/int2 weights otherwise fail there with "Cannot set version_counter for
      inference tensor" (the ``t()`` view of a tensor subclass); outputs are ordinary tensors.
    - a layer with quantized activations refuses to run until its activation scales were
      calibrated (or loaded), instead of computing with the placeholder scale 1.
    """

    calibrated: bool = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.activation_qtype is not None and not self.calibrated:
            raise quantplug.ConfigError(
                f"this quanto layer quantizes activations ({self.activation_qtype.name}) but its activation "
                f"scales were never calibrated. Quantize with quantplug.quantize(model, config, "
                f"calibration_data=[...]); quantize-on-load (quantplug.load(path, config=...)) cannot "
                f"calibrate: load the full-precision model, then quantize it with calibration_data",
                field="calibration_data",
                value=None,
                allowed="an iterable of model inputs",
            )
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    @property
    def output_quantized(self) -> bool:
        """Whether the output quantization hook optimum-quanto registered is still in place."""
        handle = self._quantize_hooks.get("output")
        return handle is not None and handle.id in self._forward_hooks


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    else:
        model(batch)


class QuantoQuantizer(quantplug.Quantizer):
    config: QuantoConfig

    @property
    def weights(self):
        return QTYPES[self.config.weights]

    @property
    def activations(self):
        return None if self.config.activations is None else QTYPES[self.config.activations]

    def needs_calibration(self) -> bool:
        return self.config.activations is not None

    def _qmodule(self, module: nn.Linear) -> QuantoLinear:
        qmodule = QuantoLinear.from_module(module, weights=self.weights, activations=self.activations)
        qmodule.freeze()  # weights -> optimum-quanto's quantized tensors (and its CPU/CUDA kernels)
        qmodule.calibrated = self.activations is None
        return qmodule

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        return self._qmodule(module)

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return self._qmodule(module)  # module is on the meta device: so is the result

    def calibrate(self, model: nn.Module, batches: list[Any]) -> None:
        layers = [
            m for m in model.modules() if isinstance(m, QuantoLinear) and m.activation_qtype is not None
        ]
        for m in layers:
            m.calibrated = True
        training = model.training
        model.eval()  # no dropout while measuring activations
        try:
            with Calibration(streamline=True):
                for batch in batches:
                    _run(model, batch)
        except BaseException:
            for m in layers:
                m.calibrated = False
            raise
        finally:
            model.train(training)

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        if qmodule.activation_qtype is not None and not qmodule.calibrated:
            raise quantplug.ConfigError(
                f"{name}: activation scales were never calibrated; quantize with "
                f"quantplug.quantize(model, config, calibration_data=[...]) before saving",
                field="calibration_data",
                value=None,
                allowed="an iterable of model inputs",
            )
        tensors = dict(qmodule.state_dict())  # optimum-quanto flattens its tensor subclasses here
        if qmodule.activation_qtype is not None:
            tensors[OUTPUT_FLAG] = torch.tensor(qmodule.output_quantized, device=qmodule.input_scale.device)
        return tensors

    def expected_tensors(self, name: str, module: nn.Linear) -> dict[str, tuple]:
        spec = {k: (tuple(t.shape), t.dtype) for k, t in self.empty_module(name, module).state_dict().items()}
        if self.activations is not None:
            spec[OUTPUT_FLAG] = ((), torch.bool)
        return spec

    def _packed_weight(self, qmodule: QuantoLinear, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The int4/int2 weight from its flattened tensors (popped from ``tensors``), in the layout
        optimum-quanto picks for the device. Its ``_load_from_state_dict`` would do the same through
        ``optimize()``, which unpacks and repacks every weight even when the layout stays the same:
        that doubled load time (about 0.1 s per SmolLM2 layer here); ``create`` unpacks only when it
        switches layout (e.g. tinygemm for bf16)."""
        flat = WeightQBitsTensor.load_from_state_dict(
            tensors,
            "weight.",
            qtype=self.weights,
            axis=0,
            group_size=qmodule.weight_group_size,
            size=qmodule.weight.size(),
            stride=qmodule.weight.stride(),
            missing_keys=[],
        )
        return WeightQBitsTensor.create(
            flat.qtype,
            flat.axis,
            flat._group_size,
            flat.size(),
            flat.stride(),
            flat._data,
            flat._scale,
            flat._shift,
        )

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        tensors = dict(tensors)
        flag = tensors.pop(OUTPUT_FLAG, None)
        # An unfrozen QLinear on the meta device: optimum-quanto's _load_from_state_dict rebuilds the
        # quantized weight from the flattened tensors (and picks the kernel layout for the device).
        qmodule = QuantoLinear.qcreate(module, self.weights, self.activations, device="meta")
        if self.weights.bits < 8:
            tensors["weight"] = self._packed_weight(qmodule, tensors)
        qmodule.load_state_dict(tensors, strict=True, assign=True)
        if not qmodule.frozen:
            raise quantplug.CheckpointError(f"{name}: the checkpoint did not hold a quantized weight")
        if flag is not None and not bool(flag):
            qmodule.disable_output_quantization()
        qmodule.calibrated = True
        return qmodule
