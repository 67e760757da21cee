"""torchao's weight-only integer tensors as a ``quantplug.IntegerGrid`` and back, bit for bit.

Two layouts hold a plain grid, both unpacked signed codes in an int8 ``qdata [out, in]``:

- ``Int8Tensor`` (``int8_weight_only``): one float32 ``scale [out, 1]`` per row, ``zero_point
  [out, 1]`` int8 (zeros: symmetric);
- ``IntxUnpackedToInt8Tensor`` (``intx_weight_only``, 2 to 8 bits, torchao's CPU group-wise layout):
  ``scale [out, groups]`` in the model's dtype and ``zero_point [out, groups]`` int8.

``encode_tensors`` gives the flattened tensors (``_weight_qdata`` ...) that the quantizer's
``load_module`` rebuilds with torchao's own ``unflatten_tensor_state_dict``, as a load does.
``int4_weight_only``'s packed layouts (tile_packed_to_4d, plain, preshuffled, plain_int32) are
built by packing ops that need CUDA or the mslk package: not described or rebuilt here.
"""

from __future__ import annotations

import torch

import quantplug

GRID_TYPES = ("Int8Tensor", "IntxUnpackedToInt8Tensor")


def _symmetric(config) -> bool:
    if config.mode == "int8_weight_only":
        return True
    mapping = config.quant_type["default"]["_data"].get("mapping_type") or {}
    return str(mapping.get("_data", mapping)).upper() != "ASYMMETRIC"


def integer_grid(name: str, qmodule) -> quantplug.IntegerGrid | str:
    weight = getattr(qmodule, "weight", None)
    kind = type(weight).__name__
    if kind not in GRID_TYPES:
        return (
            f"its weight is a torchao {kind}; only int8_weight_only (Int8Tensor) and intx_weight_only "
            f"(IntxUnpackedToInt8Tensor) layers are described as integer grids"
        )
    if getattr(weight, "act_quant_kwargs", None) is not None or getattr(
        weight, "activation_quantization", None
    ):
        return "its inputs are quantized too (dynamic activations): a weight-only grid would change what it computes"
    out_f, in_f = weight.shape
    block = list(getattr(weight, "block_size", []))
    if len(block) != 2 or block[0] != 1 or in_f % block[1]:
        return f"its block size {block} is not groups of inputs within a row"
    bits = (
        8 if kind == "Int8Tensor" else int(str(weight.target_dtype).removeprefix("torch.int"))
    )  # int1..int8
    zero = weight.zero_point
    zero = None if zero is None or not zero.any() else zero.reshape(out_f, -1).to(torch.int8).contiguous()
    bias = qmodule.bias.detach() if qmodule.bias is not None else None
    return quantplug.IntegerGrid(
        weight.qdata.contiguous(), weight.scale.reshape(out_f, -1), zero, bits, block[1], bias
    )


def encode_tensors(config, name: str, module: torch.nn.Linear, grid: quantplug.IntegerGrid, layout) -> dict:
    """The flattened tensors of the torchao weight holding ``grid`` (keys / dtypes / shapes: what
    ``layout()`` gives, the quantizer's ``expected_tensors``, asked for once the mode is known to be a
    grid's); ``PluginError`` for a grid it cannot hold."""
    mode, bits = config.mode, config.weight_bits
    out_f, in_f = module.out_features, module.in_features
    group = in_f if config.group_size in (None, -1) else config.group_size
    sym = _symmetric(config)

    def refuse(why: str) -> quantplug.PluginError:
        return quantplug.PluginError(
            f"torchao layer {name!r} ({mode}, {bits}-bit, groups of {group}, "
            f"{'symmetric' if sym else 'asymmetric'}) cannot hold this integer grid: {why}"
        )

    if mode == "int4_weight_only":
        raise refuse(
            f"int4_weight_only's {config.int4_packing_format} layout is packed by torchao ops that need CUDA or "
            f"the mslk package; it is not rebuilt from a grid (intx_weight_only holds int4 grids on CPU)"
        )
    if mode not in ("int8_weight_only", "intx_weight_only"):
        raise refuse("only int8_weight_only and intx_weight_only layers are integer grids")
    grid.check(name)
    expected = layout()
    if tuple(grid.codes.shape) != (out_f, in_f):
        raise refuse(f"its codes are {list(grid.codes.shape)}, the layer is [{out_f}, {in_f}]")
    if grid.bits != bits or grid.group_size != group:
        raise refuse(f"the grid is {grid.bits}-bit with groups of {grid.group_size}")
    if grid.columns is not None:
        raise refuse("act-order (columns): torchao keeps the inputs in order")
    if grid.float_zero:
        raise refuse("float zero points; torchao stores int8 zero points")
    if sym and grid.zero_point is not None:
        raise refuse("it has zero points but the layer is symmetric")
    if (grid.bias is None) != (module.bias is None):
        raise refuse(f"the grid {'has no' if grid.bias is None else 'has a'} bias, the layer does not agree")
    scale_dtype = expected["_weight_scale"][1]
    scale = grid.scale.to(scale_dtype).reshape(expected["_weight_scale"][0])
    if not torch.equal(scale.reshape(grid.scale.shape).to(grid.scale.dtype), grid.scale):
        raise refuse(f"its {grid.scale.dtype} scales are not exact in {scale_dtype}, which the layer stores")
    zero = grid.zero_point if grid.zero_point is not None else torch.zeros_like(grid.scale, dtype=torch.int8)
    tensors = {"_weight_qdata": grid.codes.contiguous(), "_weight_scale": scale}
    if "_weight_zero_point" in expected:
        tensors["_weight_zero_point"] = zero.reshape(expected["_weight_zero_point"][0])
    if grid.bias is not None:
        tensors["bias"] = grid.bias.to(module.weight.dtype)
    missing = set(expected) - set(tensors)
    if missing:
        raise refuse(f"its layout also needs {sorted(missing)}, which a grid does not give")
    return tensors
