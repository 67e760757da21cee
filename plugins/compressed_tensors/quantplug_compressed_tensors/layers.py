"""``CompressedTensorsLinear``: a Linear layer holding its weight as compressed-tensors stores it.

Its buffers are the checkpoint's tensors under the checkpoint's names (``weight_packed`` /
``weight_scale`` / ``weight_shape`` / ``weight_zero_point`` for pack-quantized, an int8 or FP8
``weight`` for int- and float-quantized, ``input_scale`` / ``input_zero_point`` for static
activations), so ``state_dict()`` is what llm-compressor writes. The forward decompresses the weight
with compressed-tensors' own compressor (the code its ``decompress_model`` runs) and quantizes the
inputs with its own ``forward_quantize`` (dynamic per-token or static per-tensor), then runs a
dense matmul: the arithmetic of the library's model after decompression, one layer at a time, so
memory stays at the compressed size. No fused kernel: on CPU this is slower than the dense layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from torch import nn


class CompressedTensorsLinear(nn.Module):
    def __init__(
        self,
        scheme: QuantizationScheme,
        fmt: str,
        in_features: int,
        out_features: int,
        tensors: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantization_scheme = scheme
        self.format = fmt
        self.compressor = self.compressor_of(fmt)
        # what compressed-tensors' forward_quantize reads: the weight is stored compressed
        self.quantization_status = QuantizationStatus.COMPRESSED
        self.observing = False  # True while calibration records input ranges (no input quantization)
        for key, value in tensors.items():
            self.register_buffer(key, value)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @staticmethod
    def compressor_of(fmt: str):
        """compressed-tensors' compressor class for a format name (``"pack-quantized"``, ...)."""
        return BaseCompressor.get_value_from_registry(fmt)

    def compressed_state(self) -> dict[str, torch.Tensor]:
        return {k: b for k, b in self.named_buffers(recurse=False)}

    def dense_weight(self) -> torch.Tensor:
        """The weight as compressed-tensors decompresses it (in the scales' dtype)."""
        return self.compressor.decompress(self.compressed_state(), self.quantization_scheme)["weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.quantization_scheme.input_activations
        if inputs is not None and not self.observing:
            x = forward_quantize(self, x, "input", inputs)
        weight = self.dense_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        w = self.quantization_scheme.weights
        acts = self.quantization_scheme.input_activations
        a = "16-bit inputs" if acts is None else f"{acts.type}{acts.num_bits} {acts.strategy} inputs"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"weights={w.type}{w.num_bits} {w.strategy}{'' if w.symmetric else ' asym'}, {a}"
        )
