"""Float8 export into compressed-tensors (``quantplug.export`` of fp8 / fbgemm_fp8 checkpoints): the
config groups that hold ``quantplug.Float8Layout`` s as they are, and the layers built from
``quantplug.Float8Grid`` s. The e4m3 codes are the ``weight`` and the scales the ``weight_scale`` of
compressed-tensors' float-quantized format, unchanged:

- a scale per tile (fp8 ``weight_block_size`` [bm, bn])  -> FP8_BLOCK: ``strategy: block``,
  ``block_structure: [bm, bn]``, inputs quantized dynamically per group of ``bn`` (per token group);
- a scale per row (fbgemm_fp8)                            -> FP8_DYNAMIC: ``strategy: channel``, inputs
  dynamic per token;
- one scale per tensor (fp8 ``weight_block_size: null``)  -> ``strategy: tensor`` weights, inputs
  dynamic per token (compressed-tensors has no preset of it; vLLM serves it as FP8 W8A8).

The dynamic inputs are the activation scheme the source formats declare (``activation_scheme:
"dynamic"``: Transformers' and vLLM's fp8 kernels quantize inputs per token group, FBGEMM per row);
quantplug-float computes weight-only on CPU, compressed-tensors rounds the inputs to fp8 on CPU too.
Light: no torch or compressed-tensors import at module level (the config imports this).
"""

from __future__ import annotations

import copy
from typing import Any

import quantplug


def _float_weights(strategy: str, block: list[int] | None = None) -> dict:
    out = {
        "dynamic": False,
        "group_size": None,
        "num_bits": 8,
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
    }
    if block is not None:
        out["block_structure"] = list(block)
    return out


def _dynamic_inputs(strategy: str, group_size: int | None = None) -> dict:
    return {
        "dynamic": True,
        "group_size": group_size,
        "num_bits": 8,
        "strategy": strategy,
        "symmetric": True,
        "type": "float",
    }


def fp8_block_group(block: list[int]) -> dict[str, Any]:
    """compressed-tensors' FP8_BLOCK scheme (with another tile when ``block`` is not [128, 128])."""
    return {
        "format": "float-quantized",
        "input_activations": _dynamic_inputs("group", block[1]),
        "output_activations": None,
        "targets": ["Linear"],
        "weights": _float_weights("block", block),
    }


def float8_group(layout) -> dict[str, Any]:
    """The config group holding one ``Float8Layout``'s tensors as they are."""
    if layout.strategy == "block":
        return fp8_block_group(list(layout.block))
    return {
        "format": "float-quantized",
        "input_activations": _dynamic_inputs("token"),
        "output_activations": None,
        "targets": ["Linear"],
        "weights": _float_weights(layout.strategy),
    }


def float8_config_fields(layouts: dict[str, Any], unquantized: list[str]) -> dict[str, Any]:
    """``config_groups`` and ``ignore`` for ``CompressedTensorsConfig.for_float8_grids``: one group per
    (strategy, tile); with a single group it targets ``Linear`` and ignores the layers left in full
    precision, as llm-compressor writes it, otherwise each group targets its layers by name."""
    by_kind: dict[tuple, list[str]] = {}
    for name, layout in layouts.items():
        if layout.strategy == "block" and layout.block[0] == 1:
            raise quantplug.ConfigError(
                f"export: {name} has float8 scales per {layout.block[1]} inputs of a row (tiles "
                f"{list(layout.block)}), which compressed-tensors' FP8 block scheme (tiles of rows x columns, "
                f"served by vLLM) does not hold",
                field="format",
                value="compressed-tensors",
            )
        if layout.strategy == "block" and layout.in_features % layout.block[1]:
            raise quantplug.ConfigError(
                f"export: {name} has {layout.in_features} inputs, which its tiles' {layout.block[1]} columns do "
                f"not divide; compressed-tensors' FP8 block scheme quantizes the inputs in groups of "
                f"{layout.block[1]} (as vLLM does), which needs whole groups",
                field="format",
                value="compressed-tensors",
            )
        key = (layout.strategy, tuple(layout.block) if layout.strategy == "block" else None)
        by_kind.setdefault(key, []).append(name)
    groups = {}
    for i, names in enumerate(by_kind.values()):
        group = copy.deepcopy(float8_group(layouts[names[0]]))
        group["targets"] = ["Linear"] if len(by_kind) == 1 else list(names)
        groups[f"group_{i}"] = group
    ignore = list(unquantized) if len(by_kind) == 1 else []
    return {"config_groups": groups, "ignore": tuple(ignore)}


def strategy_problems(weights: dict[str, Any], inputs: dict[str, Any] | None) -> list[str]:
    """What is wrong with a group's block weights (``block_structure``) or per-group inputs (dynamic,
    ``group_size``): the keys of FP8_BLOCK-style schemes."""
    problems = []
    block = weights.get("block_structure")
    if weights.get("strategy") == "block":
        if not (
            isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        ):
            problems.append(
                f"weights.block_structure={block!r}: a block strategy needs [rows, cols] of positive ints"
            )
        if weights.get("type") != "float":
            problems.append(
                "weights.strategy='block': block-wise scales are read for float (FP8) weights only"
            )
        if inputs is None or inputs.get("strategy") != "group":
            problems.append(
                "weights.strategy='block' is read with dynamic per-group input activations only "
                "(compressed-tensors' FP8_BLOCK scheme, the one vLLM serves)"
            )
    elif block is not None:
        problems.append(f"weights.block_structure={block!r}: given only with strategy 'block'")
    if inputs is not None and inputs.get("strategy") == "group":
        gs = inputs.get("group_size")
        if inputs.get("dynamic") is not True:
            problems.append("per-group input activations must be dynamic")
        if not isinstance(gs, int) or gs <= 0:
            problems.append(
                f"input_activations.group_size={gs!r}: per-group inputs need a positive group size"
            )
    return problems


def encode_float8(quantizer, name: str, module, grid):
    """The ``CompressedTensorsLinear`` holding ``grid``'s codes and scales (in the model's dtype, as
    compressed-tensors stores them: refused when that dtype cannot hold the scales exactly)."""
    import torch

    from .layers import CompressedTensorsLinear

    scheme, fmt = quantizer.scheme_of(name, module)
    w, layout = scheme.weights, grid.layout
    block = None if w.block_structure is None else tuple(w.block_structure)
    fits = w.type == "float" and w.strategy == layout.strategy
    if not fits or (layout.strategy == "block" and block != tuple(layout.block)):
        raise quantplug.PluginError(
            f"export: {name}'s scheme ({fmt}, {w}) does not fit its float8 grid ({layout})"
        )
    dtype = module.weight.dtype
    scale = grid.scale.to(dtype)
    if not torch.equal(scale.float(), grid.scale):
        raise quantplug.ConfigError(
            f"export: {name}'s float32 scales are values that {dtype} (the model's dtype, which "
            f"compressed-tensors stores scales in) cannot hold exactly; load the source model in float32 "
            f"(quantplug.load(..., dtype=torch.float32)), save it, and export that",
            field="dtype",
            value=str(dtype),
        )
    if layout.strategy == "tensor":
        scale = scale.reshape(1)
    tensors = {"weight": grid.codes.contiguous(), "weight_scale": scale.contiguous()}
    bias = grid.bias.detach().to(dtype) if grid.bias is not None else None
    return CompressedTensorsLinear(scheme, fmt, layout.in_features, layout.out_features, tensors, bias)
