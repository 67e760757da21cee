"""``Fp8Linear`` and ``Fp8Experts``: e4m3 weights held as 1 byte each, dequantized per layer (per
expert) on every forward into a scratch weight of the activations' dtype (``codec.dequantize``).

Tensor names are Transformers': ``weight`` e4m3 [out, in] with ``weight_scale_inv`` (fp8, mxfp8:
the tile grid, or one scalar per tensor) or ``weight_scale`` [out, 1] (fbgemm_fp8), an optional
``activation_scale`` (fp8 static: stored, not used on CPU) and ``bias``; stacked experts hold
``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] with ``{param}_scale_inv`` [E, grid rows, grid
cols], as Transformers' ``FP8Experts`` does (gate tiles over up tiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import quantplug

from . import codec


class Fp8Linear(nn.Module):
    """A Linear layer whose weight is e4m3 codes times a scale per tile of ``block``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        block: tuple[int, int] | None,
        scale_name: str = "weight_scale_inv",
        scale_dtype: torch.dtype = torch.float32,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        static: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = block if block is not None else (out_features, in_features)
        self.per_tensor = block is None
        self.scale_name = scale_name
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=codec.E4M3, device=device)
        )
        grid = () if self.per_tensor else codec.grid_shape(out_features, in_features, self.block)
        self.register_buffer(scale_name, torch.empty(grid, dtype=scale_dtype, device=device))
        act = torch.empty((), dtype=torch.float32, device=device) if static else None
        self.register_buffer("activation_scale", act)
        bias_data = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if bias_data is None else nn.Parameter(bias_data, requires_grad=False)

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self, self.scale_name)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] this layer computes with, in ``dtype``."""
        return codec.dequantize(self.weight, self.scale, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        kind = "per tensor" if self.per_tensor else f"block={list(self.block)}"
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, {kind}, {self.scale_name}"


def _default_gate(self: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


class Fp8Experts(nn.Module):
    """Stacked experts (non-transposed, gate and up concatenated, no biases: Qwen-MoE, Mixtral,
    DeepSeek...) in e4m3, called as the module it replaces ``(hidden, top_k_index, top_k_weights)``;
    the gate function (``_apply_gate``), activation and any post-expert norm are the model's."""

    def __init__(
        self, layout, block: tuple[int, int], scale_dtype: torch.dtype, carried: dict, gate_fn, device=None
    ):
        super().__init__()
        self.layout, self.block = layout, block
        self.num_experts = layout.num_experts
        self._gate_fn = gate_fn
        for key, value in carried.items():
            setattr(self, key, value)  # act_fn, limit, post_expert_norm, ...
        e, h, i = layout.num_experts, layout.hidden, layout.intermediate
        halves = 2 if layout.has_gate else 1
        self.half_rows = codec.grid_shape(i, h, block)[0]  # scale rows of one of gate / up
        for param, (rows, cols), grid_rows in (
            (layout.up_param, (halves * i, h), halves * self.half_rows),
            ("down_proj", (h, i), codec.grid_shape(h, i, block)[0]),
        ):
            self.register_buffer(param, torch.empty(e, rows, cols, dtype=codec.E4M3, device=device))
            grid = (e, grid_rows, codec.grid_shape(rows, cols, block)[1])
            self.register_buffer(param + "_scale_inv", torch.empty(grid, dtype=scale_dtype, device=device))

    def weight(self, param: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        q, s = getattr(self, param)[e], getattr(self, param + "_scale_inv")[e]
        if param == "down_proj" or not self.layout.has_gate or q.shape[0] == s.shape[0] * self.block[0]:
            return codec.dequantize(q, s, self.block, dtype)
        i, r = self.layout.intermediate, self.half_rows  # halves tiled apart: dequantize each
        return torch.cat(
            [
                codec.dequantize(q[:i], s[:r], self.block, dtype),
                codec.dequantize(q[i:], s[r:], self.block, dtype),
            ]
        )

    def _mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        up = F.linear(x, self.weight(self.layout.up_param, e, x.dtype))
        h = self._gate_fn(self, up) if self.layout.has_gate else self.act_fn(up)
        out = F.linear(h, self.weight("down_proj", e, x.dtype))
        if self.layout.has_post_expert_norm:
            out = self.post_expert_norm(out)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return quantplug.route_top_k(hidden_states, top_k_index, top_k_weights, self.num_experts, self._mlp)

    def extra_repr(self) -> str:
        lo = self.layout
        return f"num_experts={lo.num_experts}, hidden={lo.hidden}, intermediate={lo.intermediate}, e4m3, block={list(self.block)}"


def carried_state(module: nn.Module) -> tuple[dict, object]:
    """What an experts module's forward needs besides its weights: its submodules (activation,
    post-expert norm) and plain attributes, and its gate function."""
    carried = {k: v for k, v in module._modules.items() if v is not None}
    skip = {"training", "num_experts", "has_gate", "has_bias", "is_transposed", "is_concatenated"}
    carried.update({k: v for k, v in vars(module).items() if not k.startswith("_") and k not in skip})
    return carried, getattr(type(module), "_apply_gate", _default_gate)
