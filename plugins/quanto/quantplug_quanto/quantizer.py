"""``QuantoQuantizer`` and ``QuantoLinear``: optimum-quanto's ``QLinear`` behind quantplug's API.

Each ``nn.Linear`` becomes a ``QuantoLinear`` (optimum-quanto's ``QLinear`` through its own
``from_module`` and ``freeze``; its kernels do the matmul). Activation configs are calibrated with
optimum-quanto's ``Calibration`` mode in ``calibrate`` (called by ``quantplug.quantize(...,
calibration_data=...)``).

A layer's checkpoint tensors are its ``state_dict()``: optimum-quanto's own flattened state dict
(``weight._data``, ``weight._scale``, ...; the layout its ``requantize`` reads), plus
``quantize_output`` for activation configs (README.md, "Checkpoint layout", lists every tensor).
The core reads keys, shapes and dtypes off the layer built on the meta device (``empty_module``)
and loads with ``load_state_dict(..., assign=True)`` into it.
"""

from __future__ import annotations

from typing import Any

import torch
from optimum.quanto import Calibration, qfloat8, qint2, qint4, qint8
from optimum.quanto.nn import QLinear
from optimum.quanto.tensor.weights import WeightQBitsTensor
from torch import nn

import quantplug

from .config import QuantoConfig

QTYPES = {"int8": qint8, "int4": qint4, "int2": qint2, "float8": qfloat8}  # QuantoConfig names -> qtypes
OUTPUT_FLAG = "quantize_output"


def _uncalibrated(message: str) -> quantplug.ConfigError:
    return quantplug.ConfigError(
        message, field="calibration_data", value=None, allowed="an iterable of model inputs"
    )


class QuantoLinear(QLinear):
    """optimum-quanto's ``QLinear``, plus what quantplug needs:

    - under ``torch.inference_mode()`` the call runs with inference mode off (and gradients off):
      quanto's packed int4/int2 weights otherwise fail there with "Cannot set version_counter for
      inference tensor" (the ``t()`` view of a tensor subclass); outputs are ordinary tensors.
    - a layer with quantized activations refuses to run until its activation scales were
      calibrated (or loaded), instead of computing with the placeholder scale 1.
    - its state dict carries ``quantize_output`` (activation configs), and loading keeps int4/int2
      weights packed as stored where optimum-quanto would unpack and repack them.
    """

    calibrated: bool = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.activation_qtype is not None and not self.calibrated:
            raise _uncalibrated(
                f"this quanto layer quantizes activations ({self.activation_qtype.name}) but its activation "
                f"scales were never calibrated. Quantize with quantplug.quantize(model, config, "
                f"calibration_data=[...]); quantize-on-load (quantplug.load(path, config=...)) cannot "
                f"calibrate: load the full-precision model, then quantize it with calibration_data"
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

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.activation_qtype is not None:
            flag = torch.tensor(self.output_quantized, device=self.input_scale.device)
            destination[prefix + OUTPUT_FLAG] = flag

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        flag = state_dict.pop(prefix + OUTPUT_FLAG, None)
        loads_scales = prefix + "input_scale" in state_dict  # stored scales are calibrated ones
        if self.weight_qtype.bits < 8 and prefix + "weight" not in state_dict:
            # optimum-quanto's own load would call optimize(), which unpacks and repacks every weight
            # even when the layout stays the same (that doubled load time, about 0.1 s per SmolLM2
            # layer); create() unpacks only to switch layout (e.g. tinygemm for bf16).
            flat = WeightQBitsTensor.load_from_state_dict(
                state_dict,
                prefix + "weight.",
                qtype=self.weight_qtype,
                axis=0,
                group_size=self.weight_group_size,
                size=self.weight.size(),
                stride=self.weight.stride(),
                missing_keys=missing,
            )
            if flat is not None:
                layout = (flat.qtype, flat.axis, flat._group_size, flat.size(), flat.stride())
                state_dict[prefix + "weight"] = WeightQBitsTensor.create(
                    *layout, flat._data, flat._scale, flat._shift
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if flag is not None and not bool(flag):
            self.disable_output_quantization()
        self.calibrated = self.calibrated or loads_scales


class QuantoQuantizer(quantplug.Quantizer):
    config: QuantoConfig

    def needs_calibration(self) -> bool:
        return self.config.activations is not None

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        weights, activations = QTYPES[self.config.weights], QTYPES.get(self.config.activations)
        qmodule = QuantoLinear.from_module(module, weights=weights, activations=activations)
        qmodule.freeze()  # weights -> optimum-quanto's quantized tensors (and its CPU/CUDA kernels)
        qmodule.calibrated = activations is None
        return qmodule

    def offload_refusal(self) -> str | None:
        return (
            "optimum-quanto's weights are QTensor subclasses (WeightQBytesTensor, WeightQBitsTensor), which "
            "accelerate cannot rebuild on the meta device to offload them"
        )

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return self.quantize_module(name, module)  # module is on the meta device: so is the result

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
                    quantplug.run_batch(model, batch)
        except BaseException:
            for m in layers:
                m.calibrated = False
            raise
        finally:
            model.train(training)

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        if qmodule.activation_qtype is not None and not qmodule.calibrated:
            raise _uncalibrated(
                f"{name}: activation scales were never calibrated; quantize with "
                f"quantplug.quantize(model, config, calibration_data=[...]) before saving"
            )
        return dict(qmodule.state_dict())  # optimum-quanto flattens its tensor subclasses here
