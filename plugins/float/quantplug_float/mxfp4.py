"""MXFP4, gpt-oss's experts format (Transformers' ``integrations/mxfp4.py``), in plain PyTorch.

Per ``GptOssExperts`` module, with Transformers' names: ``{p}_blocks`` uint8 [E, out, in/32, 16]
(two e2m1 codes per byte, the low nibble first), ``{p}_scales`` uint8 [E, out, in/32] (e8m0:
``2**(byte - 127)`` per 32 inputs) and ``{p}_bias`` [E, out], for ``p`` = ``gate_up_proj`` (out = 2I,
gate and up rows interleaved as the model's) and ``down_proj`` (out = H). Dequantized, expert ``e``
is ``[out, in]``, the transpose of the model's ``{p}[e]``; ``dequantize`` is Transformers'
``_convert_moe_packed_tensors`` (e2m1 table, ``ldexp``) for one expert, bit for bit.

``quantize`` follows triton_kernels' ``downcast_to_mxfp_torch`` (what Transformers' ``Mxfp4Quantize``
calls on GPU): per 32 inputs the scale is ``amax / 6`` rounded up to a power of two (on its float32
bits), and each value rounds to the nearest e2m1 value, halves away from zero.

``Mxfp4Experts`` keeps the bytes (0.53 per weight) and dequantizes only the experts a forward routes
to, one at a time, into the activations' dtype; the gate (gpt-oss's clamped SwiGLU) is the model's.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

import quantplug

from .config import Mxfp4Config
from .fp8 import carried_state

BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between the magnitudes; a tie rounds up
PARAMS = ("gate_up_proj", "down_proj")

LINEAR_REASON = (
    "mxfp4 is gpt-oss's experts format (Transformers reads it only there); the layer stays in full "
    "precision — use fp8 or rtn for Linear layers"
)


def is_gpt_oss(layout) -> bool:
    """``GptOssExperts``' layout: transposed ([E, in, out]), gate and up interleaved, with biases,
    routed top-k. No other experts class in Transformers stores this way."""
    return (
        layout.has_gate
        and layout.has_bias
        and layout.is_transposed
        and not layout.is_concatenated
        and not layout.has_post_expert_norm
        and layout.routing == "top_k"
    )


@functools.cache
def _e2m1_codes(device: torch.device) -> torch.Tensor:
    """uint8 [2048]: the e2m1 code of a float32 ``y`` (|y| <= 6) indexed by its top 11 bits (sign,
    exponent, two mantissa bits), which decide its rounding: below 1 the grid is 0, 0.5, 1, above
    it one mantissa bit, so the second bit is the half (ties round up, as triton_kernels' bit trick)."""
    key = torch.arange(2048, dtype=torch.int32)
    lower = (key << 21).view(torch.float32)  # the least value of each key's range
    codes = torch.bucketize(lower.abs(), torch.tensor(_MIDPOINTS), right=True).to(torch.uint8)
    return (codes | ((key >> 10) << 3).to(torch.uint8)).to(device)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [..., rows, cols] (cols a multiple of 32) as blocks uint8 [..., rows, cols/32, 16] and
    scales uint8 [..., rows, cols/32]."""
    *lead, rows, cols = w.shape
    x = w.detach().float().contiguous().reshape(*lead, rows, cols // BLOCK, BLOCK)
    bits = (x.abs().amax(dim=-1, keepdim=True) / 6.0).view(torch.int32)
    bits = (bits + 0x7FFFFF) & 0x7F800000  # the power of two at or above amax / 6 (0 for 0)
    scale = bits.view(torch.float32)
    y = x * torch.where(scale == 0, 0.0, 1.0 / scale)  # exact: a power of two; |y| <= 6
    top = (y.view(torch.int32) >> 21) & 0x7FF
    codes = _e2m1_codes(w.device).index_select(0, top.reshape(-1)).view(y.shape)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (bits >> 23).to(torch.uint8).squeeze(-1)


@functools.cache
def _tables(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two values of each byte (low nibble first), and ``2**(byte - 127)`` for each scale byte,
    in ``dtype``. On a little-endian machine the pair is one 32- or 64-bit word, so one gather
    fills both (a third of the time of gathering [256, 2] rows)."""
    values = torch.tensor(FP4_VALUES, dtype=dtype)
    byte = torch.arange(256)
    pairs = torch.stack([values[byte & 15], values[byte >> 4]], dim=-1)
    if sys.byteorder == "little":
        pairs = pairs.view(torch.int32 if dtype.itemsize == 2 else torch.int64).reshape(256)
    scales = torch.ldexp(torch.ones(256, dtype=torch.float64), byte - 127).to(dtype)  # exact; 255: inf
    return pairs.to(device), scales.to(device)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., G, 16] and scales [..., G] as [..., G * 32] values in ``dtype``: what
    Transformers' ``_convert_moe_packed_tensors`` gives before its transpose."""
    compute = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    *lead, groups, half = blocks.shape
    pairs, scale_values = _tables(compute, blocks.device)
    values = pairs.index_select(0, blocks.reshape(-1).to(torch.int32)).view(compute)
    values = values.view(*lead, groups, 2 * half)
    scale = scale_values.index_select(0, scales.reshape(-1).to(torch.int32)).view(*lead, groups, 1)
    values.mul_(scale)  # exact: times a power of two
    return values.view(*lead, groups * 2 * half).to(dtype)


class Mxfp4Experts(nn.Module):
    """gpt-oss's experts in MXFP4, called as ``GptOssExperts``: ``(hidden_states, router_indices,
    routing_weights)``, computing as it does (``x @ W + b`` per routed expert, the model's
    ``_apply_gate``) with each routed expert's weights dequantized when it is used."""

    def __init__(self, layout, bias_dtype: torch.dtype, carried: dict, gate_fn, device=None):
        super().__init__()
        self.layout = layout
        self.num_experts = layout.num_experts
        self._gate_fn = gate_fn
        for key, value in carried.items():
            setattr(self, key, value)  # alpha, limit, sizes, config
        e, h, i = layout.num_experts, layout.hidden, layout.intermediate
        for param, (rows, cols) in zip(PARAMS, ((2 * i, h), (h, i)), strict=True):
            self.register_buffer(
                param + "_blocks",
                torch.empty(e, rows, cols // BLOCK, BLOCK // 2, dtype=torch.uint8, device=device),
            )
            self.register_buffer(
                param + "_scales", torch.empty(e, rows, cols // BLOCK, dtype=torch.uint8, device=device)
            )
            self.register_buffer(param + "_bias", torch.empty(e, rows, dtype=bias_dtype, device=device))

    def weight(self, param: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``e``'s ``param`` as [out, in] in ``dtype`` (the model's ``{param}[e]`` transposed)."""
        return dequantize(getattr(self, param + "_blocks")[e], getattr(self, param + "_scales")[e], dtype)

    def _mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ self.weight("gate_up_proj", e, x.dtype).t() + self.gate_up_proj_bias[e].to(x.dtype)
        h = self._gate_fn(self, gate_up)
        return h @ self.weight("down_proj", e, x.dtype).t() + self.down_proj_bias[e].to(x.dtype)

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        """GptOssExperts' sum: each routed expert, in expert order, on its tokens."""
        return quantplug.route_top_k(
            hidden_states, router_indices, routing_weights, self.num_experts, self._mlp
        )

    def extra_repr(self) -> str:
        lo = self.layout
        return f"num_experts={lo.num_experts}, hidden={lo.hidden}, intermediate={lo.intermediate}, mxfp4 (e2m1, e8m0 per 32)"


class Mxfp4Quantizer(quantplug.Quantizer):
    """mxfp4: gpt-oss's experts kept stacked (``Mxfp4Experts``); every Linear layer stays in full
    precision, as in gpt-oss's own checkpoints. A model without gpt-oss experts is refused."""

    config: Mxfp4Config

    def __init__(self, backend, config):
        super().__init__(backend, config)
        self._gpt_oss_sites: set[str] = set()
        """gpt-oss experts modules ``serves_experts`` accepted. The walk asks ``serves_experts`` of
        every experts module before ``skip_reason`` of any Linear (there is no model-level hook)."""

    def serves_experts(self, name: str, layout) -> bool:
        if not is_gpt_oss(layout):
            how = "transposed" if layout.is_transposed else "[out, in]"
            gate = (
                "no gate"
                if not layout.has_gate
                else ("interleaved" if not layout.is_concatenated else "concatenated")
            )
            raise quantplug.ConfigError(
                f"{name}: mxfp4 applies to gpt-oss only (GptOssExperts: experts stored transposed, gate and "
                f"up interleaved, with biases — the one module Transformers reads mxfp4 for); this model's experts "
                f"are {how}, gate/up {gate}, {'with' if layout.has_bias else 'without'} biases. Quantize it "
                f"with fp8, mxfp8 or rtn instead",
                field="quant_method",
                value="mxfp4",
                allowed="a gpt-oss model",
            )
        for what, size in (("hidden_size", layout.hidden), ("intermediate_size", layout.intermediate)):
            if size % BLOCK:
                raise quantplug.ConfigError(
                    f"{name}: {what} {size} is not a multiple of {BLOCK}; mxfp4 scales 32 inputs at a time "
                    f"and Transformers' layout has no ragged last block",
                    field="quant_method",
                    value="mxfp4",
                )
        self._gpt_oss_sites.add(name)
        return True

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        if not isinstance(module, nn.Linear):
            return None  # a gpt-oss experts module (serves_experts accepted it)
        if not self._gpt_oss_sites:
            raise quantplug.ConfigError(
                f"mxfp4 applies to gpt-oss only: it is the format of GptOssExperts, the one module "
                f"Transformers reads it for, and this model has no gpt-oss experts module ({name} is a "
                f"Linear layer). Quantize it with fp8, mxfp8 or rtn instead",
                field="quant_method",
                value="mxfp4",
                allowed="a gpt-oss model",
            )
        return LINEAR_REASON

    def offload_refusal(self) -> str | None:
        return None  # an experts module is its buffers, read on every forward

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        raise quantplug.ConfigError(f"{name}: {LINEAR_REASON}", field="quant_method", value="mxfp4")

    empty_module = quantize_module

    def _experts(self, module: nn.Module, layout, device) -> Mxfp4Experts:
        carried, gate_fn = carried_state(module)
        bias_dtype = module._parameters["gate_up_proj_bias"].dtype
        return Mxfp4Experts(layout, bias_dtype, carried, gate_fn, device=device)

    def empty_experts(self, name, module, layout):
        return self._experts(module, layout, "meta")

    def quantize_experts(self, name, module, layout):
        device = module._parameters["down_proj"].device
        q = self._experts(module, layout, device)
        for param in PARAMS:
            stacked = module._parameters[param].detach()  # [E, in, out]
            blocks, scales = getattr(q, param + "_blocks"), getattr(q, param + "_scales")
            for e in range(layout.num_experts):  # one expert's float32 copy at a time
                blocks[e], scales[e] = quantize(stacked[e].t())
            getattr(q, param + "_bias").copy_(module._parameters[param + "_bias"].detach())
        return q

    def expected_experts_tensors(self, name, module, layout):
        """uint8 blocks and scales as declared; biases in any float dtype (bfloat16 in gpt-oss's
        checkpoints), cast to the model's on load."""
        spec = super().expected_experts_tensors(name, module, layout)
        return {
            k: (shape, None) if k.endswith("_bias") else (shape, dtype) for k, (shape, dtype) in spec.items()
        }

    def load_experts(self, name, module, layout, tensors):
        q = self.empty_experts(name, module, layout)
        tensors = dict(tensors)
        for param in PARAMS:
            bias = tensors[param + "_bias"]
            if not bias.is_floating_point():
                raise quantplug.CheckpointError(
                    f"tensor {name + '.' + param + '_bias'!r} has dtype {bias.dtype}; biases are floating point"
                )
            tensors[param + "_bias"] = bias.to(getattr(q, param + "_bias").dtype)
        q.load_state_dict(tensors, strict=True, assign=True)
        return q
