"""``QuarkLinear``: one Linear layer of a Quark export, holding the checkpoint's tensors exactly as
stored (names, dtypes, shapes), with Quark's CPU forward (``QParamsLinear._forward_generic``):
fake-quantize the input (static scale), dequantize the weight in float32, ``F.linear`` in the
input's dtype, fake-quantize the output (KV-cache scales)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codecs import dequantize_weight, fake_quantize
from .specs import LayerScheme, TensorSpec


def stored_layout(
    scheme: LayerScheme, out_features: int, in_features: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The tensors Quark's exporter writes for a layer of ``scheme`` (keys relative to the layer),
    with shapes and dtypes (``None``: a float dtype, as written)."""
    w = scheme.weight
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    if w is None:  # excluded by Quark, its KV-cache output quantized: a full-precision weight
        out["weight"] = ((out_features, in_features), None)
    else:
        out["weight"], scale, zero = _weight_layout(w, out_features, in_features)
        out["weight_scale"] = scale
        if zero is not None:
            out["weight_zero_point"] = zero
    for role, spec in (("input", scheme.input), ("output", scheme.output)):
        if spec is not None and not spec.is_dynamic:  # (dynamic: nothing stored)
            out[f"{role}_scale"] = ((), None)
            if spec.is_int:
                out[f"{role}_zero_point"] = ((), _INT_DTYPE[spec.dtype])
    return out


_INT_DTYPE = {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.int32, "uint4": torch.int32}


def _weight_layout(w: TensorSpec, out_f: int, in_f: int):
    per_tensor, per_channel = w.qscheme == "per_tensor", w.qscheme == "per_channel"
    scale_shape: tuple[int, ...] = () if per_tensor else (out_f,)
    if w.dtype == "fp8_e4m3":
        return ((out_f, in_f), torch.float8_e4m3fn), (scale_shape, None), None
    if w.dtype in ("int8", "uint8"):
        dt = _INT_DTYPE[w.dtype]
        return ((out_f, in_f), dt), (scale_shape, None), (scale_shape, dt)
    if w.dtype == "fp4":
        return ((out_f, in_f // 2), torch.uint8), ((out_f, in_f // w.group_size), torch.uint8), None
    # int4 / uint4, eight per int32
    if per_channel:
        return ((out_f, in_f // 8), torch.int32), ((out_f,), None), ((out_f // 8,), torch.int32)
    groups = in_f // w.group_size
    return ((in_f, out_f // 8), torch.int32), ((groups, out_f), None), ((groups, out_f // 8), torch.int32)


class QuarkLinear(nn.Module):
    """A Quark-exported Linear layer: its stored tensors as buffers, Quark's forward."""

    def __init__(
        self, scheme: LayerScheme, tensors: dict[str, torch.Tensor], in_features: int, out_features: int
    ):
        super().__init__()
        self.scheme = scheme
        self.in_features = in_features
        self.out_features = out_features
        for key, tensor in tensors.items():
            self.register_buffer(key, tensor)
        if "bias" not in tensors:
            self.bias = None

    def extra_repr(self) -> str:
        s = self.scheme
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        if s.weight is not None:
            parts.append(f"weight={_label(s.weight)}")
        if s.input is not None:
            parts.append(f"input={_label(s.input)}")
        if s.output is not None:
            parts.append(f"output={_label(s.output)}")
        return ", ".join(parts)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 [out, in] weight the stored codes and scales stand for."""
        if self.scheme.weight is None:
            return self.weight.to(torch.float32)
        # contiguous, as Quark's: F.linear takes another (differently rounding) path for a strided weight
        return dequantize_weight(
            self.scheme.weight,
            self.weight,
            self.weight_scale,
            getattr(self, "weight_zero_point", None),
            self.scheme.reorder,
        ).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.scheme.input is not None:
            x = fake_quantize(
                self.scheme.input,
                x,
                getattr(self, "input_scale", None),
                getattr(self, "input_zero_point", None),
            ).to(dtype)
        w = self.dequantized_weight().to(device=x.device, dtype=dtype)
        bias = self.bias.to(device=x.device, dtype=dtype) if self.bias is not None else None
        y = F.linear(x, w, bias)
        if self.scheme.output is not None:
            y = fake_quantize(
                self.scheme.output,
                y,
                getattr(self, "output_scale", None),
                getattr(self, "output_zero_point", None),
            )
        return y.to(dtype)


def _label(spec: TensorSpec) -> str:
    group = f"-g{spec.group_size}" if spec.qscheme == "per_group" else ""
    return f"{spec.dtype}-{spec.qscheme}{group}" + ("-dynamic" if spec.is_dynamic else "")
