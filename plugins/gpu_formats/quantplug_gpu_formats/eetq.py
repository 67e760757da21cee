"""``EetqQuantizer`` and ``EetqLinear``: EETQ's int8 weight-only math in plain PyTorch.

The math is EETQ's ``quant_weights`` (FasterTransformer's ``symmetric_quantize`` for
``INT8_WEIGHT_ONLY``, which Transformers' EETQ integration calls on ``weight.T``), per output channel
``n`` of the ``[out, in]`` weight ``W``, in float32:

    scale[n] = max_k |W[n, k]| * (1 / 128)            (quant_range_scale = 1 / 2**(8 - 1))
    q[n, k]  = clamp(round(W[n, k] / scale[n]), -128, 127)   round: C's, half away from zero
    stored scale = scale in the weight's dtype (EETQ's ComputeType); W ~ q * stored scale

An all-zero row divides 0 by 0; C++'s ``std::max(-128.f, std::min(127.f, NaN))`` gives 127, so its
codes are 127 (times a zero scale: weight 0), as here.

Storage of one ``EetqLinear`` (in memory only: saving is refused, see below):
    codes   int8 [out, in]   row-major, as above (not EETQ's layout)
    scales  weight dtype [out]
    bias    weight dtype [out] (if the layer has one)

The layer is an ``IntegerGrid`` (8 bits, one group per row, symmetric), so after ``quantize`` /
quantize-on-load the core runs it on the fastest int8 kernel here (``torch-int8-cpu`` in a bfloat16 /
float16 model on a CPU); ``EetqLinear.forward`` (dequantize and matmul) runs otherwise.

Not done, on purpose: EETQ stores ``weight`` as int8 ``[in, out]`` in FasterTransformer's mixed-GEMM
layout for the SM of the GPU that quantized it (``preprocess_weights_for_mixed_gemm``: for SM75-89
rows permuted in groups of 16, transposed, ``ColumnMajorTileInterleave<64, 2>``, +128 and bytes 1 and
2 of each word swapped; SM70 another layout; SM90 refused). No CPU code can check a writer or reader
of that layout, so ``save`` is refused (``Capabilities.serializable`` is false) and reading an EETQ
checkpoint is refused before any tensor is read (``empty_module`` / ``expected_tensors``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import quantplug

from .config import EetqConfig

CHECKPOINT_REFUSAL = (
    "quantplug cannot read EETQ checkpoints (layer {name!r}), on any device: EETQ stores its int8 weights "
    "in FasterTransformer's mixed-GEMM layout for the SM of the GPU that quantized them "
    "(preprocess_weights_for_mixed_gemm: rows permuted in groups of 16, transposed, tile-interleaved, "
    "+128 with bytes swapped; another layout on SM70), and nothing on a CPU can check a reader of that "
    "layout. EETQ needs a CUDA GPU of SM 7.0-8.9, `pip install kernels accelerate` with the Hub kernel "
    "kernels-community/quantization-eetq, and Transformers: AutoModelForCausalLM.from_pretrained(path, "
    "device_map='cuda', dtype=torch.float16). What to do: load it that way on a GPU machine, or quantize "
    "the full-precision model with EETQ's math here: quantplug.load(full_precision_folder, "
    "config={{'quant_method': 'eetq'}}), which runs on the int8 kernels."
)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``round``: to the nearest integer, halves away from zero (torch.round rounds them to even)."""
    trunc = torch.trunc(x)
    return torch.where((x - trunc).abs() == 0.5, trunc + torch.sign(x), torch.round(x))


def quantize_weight(weight: torch.Tensor, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """EETQ's int8 codes [out, in] and float32 scales [out] of ``weight`` [out, in] (module docstring)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    if not torch.isfinite(amax).all():
        rows = torch.nonzero(~torch.isfinite(amax)).flatten()[:5].tolist()
        raise quantplug.QuantplugError(
            f"layer {name!r}: its weight has inf or NaN values (rows {rows}), which EETQ's per-row "
            f"scale cannot represent; fix or drop those weights, or keep the layer in full precision "
            f"(modules_to_not_convert)"
        )
    scale = amax * (1.0 / 128)
    q = round_half_away(w / scale.unsqueeze(1)).clamp(-128, 127)
    q = torch.where(scale.unsqueeze(1) == 0, 127.0, q)  # 0 / 0: C++'s clamp of NaN gives 127
    return q.to(torch.int8), scale


class EetqLinear(nn.Module):
    """A Linear layer holding EETQ's int8 codes and per-row scales; dequantizes on forward."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        data = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if data is None else nn.Parameter(data, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "layer") -> EetqLinear:
        w = linear.weight
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            dtype=w.dtype,
            device=w.device,
        )
        codes, scale = quantize_weight(w, name)
        q.codes.copy_(codes)
        q.scales.copy_(scale)  # rounded to the weight's dtype, as EETQ stores it
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scales.dtype
        return self.codes.to(dtype) * self.scales.to(dtype).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel (EETQ)"


class EetqQuantizer(quantplug.Quantizer):
    """Quantizes with EETQ's math; refuses EETQ checkpoints (module docstring)."""

    config: EetqConfig

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        return EetqLinear.from_linear(module, name)

    def _refuse(self, name: str) -> quantplug.BackendUnavailableError:
        return quantplug.BackendUnavailableError(CHECKPOINT_REFUSAL.format(name=name))

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        raise self._refuse(name)

    def expected_tensors(self, name: str, module: nn.Linear):
        raise self._refuse(name)

    def load_module(self, name: str, module: nn.Linear, tensors) -> nn.Module:
        raise self._refuse(name)

    def integer_grid(self, name: str, qmodule: nn.Module):
        """8-bit signed codes, one group per row (``group_size = in_features``), no zero point."""
        if not isinstance(qmodule, EetqLinear):
            return f"{type(qmodule).__name__} is not an EetqLinear"
        bias = None if qmodule.bias is None else qmodule.bias.detach()
        return quantplug.IntegerGrid(
            qmodule.codes, qmodule.scales.unsqueeze(1), None, 8, qmodule.in_features, bias
        )

    def encode_grid(self, name: str, module: nn.Linear, grid: quantplug.IntegerGrid) -> nn.Module:
        """The ``EetqLinear`` holding exactly ``grid``: the inverse of ``integer_grid``."""
        out_f, in_f = module.out_features, module.in_features
        problem = None
        if tuple(grid.codes.shape) != (out_f, in_f):
            problem = f"codes {list(grid.codes.shape)} for a layer of [{out_f}, {in_f}]"
        elif grid.bits != 8 or grid.zero_point is not None or grid.columns is not None:
            problem = "EETQ holds symmetric 8-bit codes in input order only"
        elif grid.group_size != in_f or tuple(grid.scale.shape) != (out_f, 1):
            problem = f"groups of {grid.group_size} inputs; EETQ has one scale per output channel"
        if problem:
            raise quantplug.PluginError(f"eetq cannot hold the grid of {name!r}: {problem}")
        q = EetqLinear(in_f, out_f, bias=grid.bias is not None, dtype=grid.scale.dtype, device="meta")
        q.codes = grid.codes.contiguous().clone()
        q.scales = grid.scale.reshape(-1).contiguous().clone()
        if grid.bias is not None:
            q.bias = nn.Parameter(grid.bias.detach().clone(), requires_grad=False)
        return q
