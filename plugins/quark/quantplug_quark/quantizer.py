"""``QuarkQuantizer``: loads Quark's exported Linear layers into ``QuarkLinear`` (load-only).

Which layers are quantized, and how, is Quark's rule (``QuarkConfig.scheme_for``): ``exclude``
first, then ``layer_quant_config`` / ``layer_type_quant_config`` / ``global_quant_config``; a layer
whose config has no weight spec stays in full precision. Each layer's tensors are checked against
the layout Quark's exporter writes (``layer.stored_layout``) and kept as stored, so a re-save
writes the same bytes.
"""

from __future__ import annotations

import torch
from torch import nn

import quantplug

from .layer import QuarkLinear, stored_layout
from .specs import LayerScheme

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class QuarkQuantizer(quantplug.Quantizer):
    def __init__(self, backend, config):
        super().__init__(backend, config)
        self._schemes: dict[str, LayerScheme | None] = {}

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        raise quantplug.BackendUnavailableError(
            "quantplug-quark does not quantize: it loads checkpoints AMD Quark exported "
            "(quantplug.load(folder)). Quantizing with Quark needs amd-quark's ModelQuantizer and its "
            "exporter (export_safetensors), which this plugin does not wrap (a C++ extension built on "
            "first import, calibration, many dependencies); quantize there, or pick a backend that "
            "quantizes here (`quantplug select`)."
        )

    def needs_calibration(self) -> bool:
        return False  # never reached for quantizing (refused above); loading needs no data

    def offload_refusal(self) -> str | None:
        return "quantplug-quark has not been checked with accelerate's offloading hooks"

    # -- which layers, how ----------------------------------------------------------------------

    def scheme(self, name: str) -> LayerScheme | None:
        if name not in self._schemes:
            self._schemes[name] = self.config.scheme_for(name)
        return self._schemes[name]

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        if self.scheme(name) is not None:
            return None
        pattern = self.config.excluded_by(name)
        if pattern is not None:
            return f"excluded by Quark's exclude pattern {pattern!r}"
        return "its Quark layer config quantizes nothing"

    def _layout(self, name: str, module: nn.Linear):
        scheme = self.scheme(name)
        if scheme is None:  # (skip_reason keeps such layers out of the plan)
            raise quantplug.CheckpointError(f"{name}: Quark's config quantizes no weight of this layer")
        out_f, in_f = module.out_features, module.in_features
        w = scheme.weight
        need = (
            None
            if w is None
            else {"fp4": (w.group_size or 32, 1), "int4": (8, 8), "uint4": (8, 8)}.get(w.dtype)
        )
        if w is not None and w.qscheme == "per_group":
            need = (max(need[0], w.group_size) if need else w.group_size, need[1] if need else 1)
        if scheme.input is not None and scheme.input.is_dynamic:  # MXFP4 blocks of 32 inputs
            need = (max(need[0], 32), need[1]) if need else (32, 1)
        if need and (in_f % need[0] or out_f % need[1]):
            raise quantplug.CheckpointError(
                f"{name}: a [{out_f}, {in_f}] layer cannot hold {w.dtype} {w.qscheme} weights from "
                f"{scheme.source} (its input features must divide by {need[0]} and its outputs by {need[1]}): "
                f"the checkpoint does not match config.json's model"
            )
        layout = stored_layout(scheme, out_f, in_f)
        if module.bias is not None:
            layout["bias"] = ((out_f,), None)
        return scheme, layout

    # -- the stored tensors -----------------------------------------------------------------------

    def expected_tensors(self, name: str, module: nn.Linear):
        return self._layout(name, module)[1]

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        scheme, layout = self._layout(name, module)
        tensors = {
            k: torch.empty(shape, dtype=dtype or module.weight.dtype, device="meta")
            for k, (shape, dtype) in layout.items()
        }
        return QuarkLinear(scheme, tensors, module.in_features, module.out_features)

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        scheme, layout = self._layout(name, module)
        missing = sorted(set(layout) - set(tensors))
        extra = sorted(set(tensors) - set(layout))
        if missing or extra:
            what = f"missing {missing}" if missing else f"unexpected {extra}"
            raise quantplug.CheckpointError(f"{name}: {what} for {scheme.source} ({_describe(scheme)})")
        for key, (shape, dtype) in layout.items():
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise quantplug.CheckpointError(
                    f"{name}.{key}: shape {list(t.shape)}, expected {list(shape)} for {_describe(scheme)}"
                )
            if dtype is None and t.dtype not in _FLOATS:
                raise quantplug.CheckpointError(
                    f"{name}.{key}: stored as {t.dtype}, expected float32, float16 or bfloat16 "
                    f"({_describe(scheme)}): the checkpoint is damaged or not a Quark export"
                )
            if dtype is not None and t.dtype != dtype:
                raise quantplug.CheckpointError(
                    f"{name}.{key}: stored as {t.dtype}, expected {dtype} ({_describe(scheme)})"
                )
        return QuarkLinear(scheme, dict(tensors), module.in_features, module.out_features)

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        return dict(qmodule.state_dict())

    def explain_stored_layout(self, name: str, stored: dict) -> str | None:
        scheme = self.scheme(name)
        weight = stored.get("weight")
        if scheme is not None and scheme.weight is not None and weight is not None and weight[1] in _FLOATS:
            return (
                f"the weight is stored in full precision ({weight[1]}), while {scheme.source} says "
                f"{_describe(scheme)}: a 'fake_quantized' export, or a layer Quark's exclude should name"
            )
        return None

    def integer_grid(self, name: str, qmodule: nn.Module):
        return "Quark layers run Quark's own dequantize-then-matmul forward (its scales and activation fake quantization)"


def _describe(scheme: LayerScheme) -> str:
    w = scheme.weight
    if w is None:
        text = "full-precision weights"
    else:
        text = f"{w.dtype} {w.qscheme} weights" + (
            f" (group {w.group_size})" if w.qscheme == "per_group" else ""
        )
    for role, spec in (("inputs", scheme.input), ("outputs", scheme.output)):
        if spec is not None:
            text += f", {'dynamic' if spec.is_dynamic else 'static'} {spec.dtype} {role}"
    return text
