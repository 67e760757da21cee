"""``integer_grid`` / ``encode_grid`` of torchao layers: int8_weight_only (``Int8Tensor``) and
intx_weight_only (``IntxUnpackedToInt8Tensor``, CPU group-wise) layers quantized by torchao (and
rebuilt from their flattened tensors, as a load does) read as an exact ``IntegerGrid`` that
dequantizes to torchao's own ``dequantize()``, and rebuild byte-identical through torchao's
unflatten; other modes say why, int4_weight_only's packed layouts are refused, bad grids too."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import quantplug
from quantplug_torchao import TorchaoConfig

NAME = "model.layers.0.mlp.down_proj"


def _layer(mode: str, dtype=torch.bfloat16, bias=True, **kwargs):
    quantizer = quantplug.AutoQuantizer.from_config(TorchaoConfig.from_mode(mode, **kwargs))
    torch.manual_seed(0)
    dense = nn.Linear(256, 96, bias=bias).to(dtype)
    meta = nn.Linear(256, 96, bias=bias, device="meta", dtype=dtype)
    return quantizer, quantizer.quantize_module(NAME, dense), meta


CASES = [
    ("int8_weight_only", torch.bfloat16, True, {}, (8, 256, True)),
    ("int8_weight_only", torch.float32, False, {}, (8, 256, True)),
    ("intx_weight_only", torch.bfloat16, True, {"bits": 4, "group_size": 32}, (4, 32, True)),
    (
        "intx_weight_only",
        torch.float16,
        False,
        {"bits": 4, "group_size": 64, "symmetric": False},
        (4, 64, False),
    ),
    ("intx_weight_only", torch.bfloat16, False, {"bits": 8, "group_size": -1}, (8, 256, True)),
    (
        "intx_weight_only",
        torch.float32,
        True,
        {"bits": 2, "group_size": 128, "symmetric": False},
        (2, 128, False),
    ),
]


@pytest.mark.parametrize(
    ("mode", "dtype", "bias", "kwargs", "shape"),
    CASES,
    ids=[
        "int8-bf16",
        "int8-fp32",
        "int4-g32-bf16",
        "int4-g64-asym-fp16",
        "int8-channel-intx",
        "int2-g128-asym",
    ],
)
def test_grid_round_trip(mode, dtype, bias, kwargs, shape):
    quantizer, quantized, meta = _layer(mode, dtype, bias, **kwargs)
    loaded = quantizer.load_module(
        NAME, meta, quantizer.module_tensors(NAME, quantized)
    )  # as a load builds it
    for qmodule in (quantized, loaded):
        grid = quantizer.integer_grid(NAME, qmodule)
        assert isinstance(grid, quantplug.IntegerGrid), grid
        grid.check(NAME)
        assert (grid.bits, grid.group_size, grid.zero_point is None) == shape
        stored = quantizer.module_tensors(NAME, qmodule)
        assert grid.scale.dtype == stored["_weight_scale"].dtype
        own = qmodule.weight.dequantize().float()
        mine = grid.dequantize().float()
        assert ((mine - own).norm() / own.norm()).item() < (1e-6 if dtype == torch.float32 else 1e-2)
        rebuilt = quantizer.encode_grid(NAME, meta, grid)
        assert type(rebuilt.weight) is type(qmodule.weight)
        after = quantizer.module_tensors(NAME, rebuilt)
        assert stored.keys() == after.keys()
        for key in stored:
            assert stored[key].dtype == after[key].dtype and stored[key].shape == after[key].shape, key
            assert torch.equal(stored[key], after[key]), key
        x = torch.randn(3, 256, dtype=dtype)
        with torch.no_grad():
            out = qmodule(x)
            assert torch.equal(rebuilt(x), out)
            by_grid = x.float() @ mine.t() + (0 if grid.bias is None else grid.bias.float())
        assert ((by_grid - out.float()).norm() / out.float().norm()).item() < 2e-2


def test_other_modes_say_why():
    quantizer, qmodule, _ = _layer("int8_dynamic_activation_int8_weight")
    assert "inputs are quantized too" in quantizer.integer_grid(NAME, qmodule)
    quantizer, qmodule, _ = _layer("float8_weight_only")
    assert "Float8Tensor" in quantizer.integer_grid(NAME, qmodule)
    assert "only int8_weight_only" in quantizer.integer_grid(NAME, nn.Linear(4, 4))


def test_bad_grids_are_refused():
    quantizer, qmodule, meta = _layer("intx_weight_only", bits=4, group_size=32)
    grid = quantizer.integer_grid(NAME, qmodule)
    zero = torch.ones_like(grid.scale, dtype=torch.int8)
    bad = {
        "is 8-bit": dataclasses.replace(grid, bits=8),
        "groups of 64": dataclasses.replace(grid, group_size=64, scale=grid.scale[:, ::2].contiguous()),
        "act-order": dataclasses.replace(grid, columns=torch.arange(256).flip(0)),
        "layer is symmetric": dataclasses.replace(grid, zero_point=zero),
        "float zero points": dataclasses.replace(grid, zero_point=grid.scale.clone()),
        "has no bias": dataclasses.replace(grid, bias=None),
        "not exact in torch.bfloat16": dataclasses.replace(grid, scale=grid.scale.float() * (1 + 1e-4)),
    }
    for why, g in bad.items():
        with pytest.raises(quantplug.PluginError, match=why) as info:
            quantizer.encode_grid(NAME, meta, g)
        assert NAME in str(info.value)
    # an asymmetric layer holds the zero points; int8_weight_only (symmetric, per row) does not
    asym, _, _ = _layer("intx_weight_only", bits=4, group_size=32, symmetric=False)
    back = asym.integer_grid(NAME, asym.encode_grid(NAME, meta, dataclasses.replace(grid, zero_point=zero)))
    assert torch.equal(back.zero_point, zero) and torch.equal(back.codes, grid.codes)
    int8, _, _ = _layer("int8_weight_only")
    with pytest.raises(quantplug.PluginError, match="the grid is 4-bit with groups of 32"):
        int8.encode_grid(NAME, meta, grid)


def test_int4_weight_only_is_refused_with_the_reason():
    """int4_weight_only's layouts are packed by CUDA / mslk ops: no grid is rebuilt into them here."""
    quantizer = quantplug.AutoQuantizer.from_config(
        TorchaoConfig.from_mode("int4_weight_only", group_size=32)
    )
    _, qmodule, meta = _layer("intx_weight_only", bits=4, group_size=32)
    grid = quantizer.integer_grid(NAME, qmodule)  # any quantizer describes a layer by its weight's type
    with pytest.raises(quantplug.PluginError, match="need CUDA or the mslk package") as info:
        quantizer.encode_grid(NAME, meta, grid)
    assert NAME in str(info.value)
