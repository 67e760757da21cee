"""``integer_grid`` / ``encode_grid`` of HQQ layers: 4 and 8-bit ``HQQLinear`` layers quantized by hqq
(and rebuilt from their stored tensors, as a load does) read as an exact ``IntegerGrid`` with float
zero points that dequantizes to hqq's own ``dequantize()``, and packed back into byte-identical
tensors and a module computing the same; other layers say why, and bad grids are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import quantplug

NAME = "model.layers.0.mlp.down_proj"


def _layer(settings: dict, dtype=torch.bfloat16, bias=True, shape=(96, 256)):
    quantizer = quantplug.AutoQuantizer.from_config({"quant_method": "hqq", **settings})
    torch.manual_seed(0)
    dense = nn.Linear(shape[1], shape[0], bias=bias).to(dtype)
    meta = nn.Linear(shape[1], shape[0], bias=bias, device="meta", dtype=dtype)
    return quantizer, quantizer.quantize_module(NAME, dense), meta


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        # bytes: view_as_float's W_q holds packed codes as floats, NaN bit patterns included
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key


@pytest.mark.parametrize(
    ("settings", "dtype", "bias"),
    [
        ({"nbits": 4, "group_size": 64}, torch.bfloat16, True),
        ({"nbits": 4, "group_size": 32}, torch.float16, False),
        ({"nbits": 4, "group_size": None}, torch.float32, True),
        ({"nbits": 4, "group_size": 64, "view_as_float": True}, torch.bfloat16, False),
        ({"nbits": 8, "group_size": 64}, torch.bfloat16, True),
        ({"nbits": 8, "group_size": 128}, torch.float32, False),
    ],
    ids=["4b-g64-bf16", "4b-g32-fp16", "4b-row-fp32", "4b-view-as-float", "8b-g64-bf16", "8b-g128-fp32"],
)
def test_grid_round_trip(settings, dtype, bias):
    quantizer, quantized, meta = _layer(settings, dtype, bias)
    loaded = quantizer.load_module(
        NAME, meta, quantizer.module_tensors(NAME, quantized)
    )  # as a load builds it
    for qmodule in (quantized, loaded):
        grid = quantizer.integer_grid(NAME, qmodule)
        assert isinstance(grid, quantplug.IntegerGrid), grid
        grid.check(NAME)
        assert grid.float_zero and grid.zero_point.dtype == grid.scale.dtype == dtype
        assert grid.bits == settings["nbits"] and grid.group_size == (settings["group_size"] or 256)
        with torch.no_grad():
            own = qmodule.dequantize().float()
        mine = grid.dequantize().float()
        bound = 1e-6 if dtype == torch.float32 else 1e-2  # hqq subtracts zero from the unshifted codes
        assert ((mine - own).norm() / own.norm()).item() < bound
        rebuilt = quantizer.encode_grid(NAME, meta, grid)
        assert type(rebuilt) is type(qmodule)
        _assert_same_tensors(quantizer.module_tensors(NAME, qmodule), quantizer.module_tensors(NAME, rebuilt))
        x = torch.randn(3, 256, dtype=dtype)
        with torch.no_grad():
            out = qmodule(x)
            assert torch.equal(rebuilt(x), out)
            by_grid = x.float() @ mine.t() + (0 if grid.bias is None else grid.bias.float())
        assert ((by_grid - out.float()).norm() / out.float().norm()).item() < 2e-2


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"nbits": 2, "group_size": 64}, "2-bit HQQ codes"),
        ({"nbits": 3, "group_size": 64}, "3-bit HQQ codes"),
        ({"nbits": 4, "group_size": 32, "axis": 0}, "axis=0"),
    ],
)
def test_layers_that_are_not_plain_grids_say_why(settings, why):
    quantizer, qmodule, meta = _layer(settings)
    reason = quantizer.integer_grid(NAME, qmodule)
    assert isinstance(reason, str) and why in reason
    assert "not a quantized HQQLinear" in quantizer.integer_grid(NAME, nn.Linear(4, 4))


def test_quantized_scale_and_inexact_zero_say_why():
    quantizer, qmodule, _ = _layer({"nbits": 8, "group_size": 64})
    qmodule.meta["quant_scale"] = True
    assert "quant_scale" in quantizer.integer_grid(NAME, qmodule)
    qmodule.meta["quant_scale"] = False
    # 1.0078125 is a bfloat16, 1.0078125 - 128 is not: the shifted zero points are held in float32
    qmodule.meta["zero"][0, 0] = 1.0078125
    grid = quantizer.integer_grid(NAME, qmodule)
    assert grid.zero_point.dtype == torch.float32 and grid.zero_point[0, 0] == 1.0078125 - 128
    # ... and where float32 cannot hold the shift either, the layer says why
    qmodule.meta["zero"] = qmodule.meta["zero"].float()
    qmodule.meta["zero"][0, 0] = 1e-7
    assert "not exact in float32" in quantizer.integer_grid(NAME, qmodule)


def test_bad_grids_are_refused():
    quantizer, qmodule, meta = _layer({"nbits": 4, "group_size": 64})
    grid = quantizer.integer_grid(NAME, qmodule)
    bad = {
        "is 8-bit": dataclasses.replace(grid, bits=8),
        "groups of 128": dataclasses.replace(
            grid,
            group_size=128,
            scale=grid.scale[:, ::2].contiguous(),
            zero_point=grid.zero_point[:, ::2].contiguous(),
        ),
        "act-order": dataclasses.replace(grid, columns=torch.arange(256).flip(0)),
        "has no bias": dataclasses.replace(grid, bias=None),
        "not exact in the layer's torch.bfloat16": dataclasses.replace(
            grid, scale=grid.scale.float() * (1 + 1e-4), zero_point=grid.zero_point.float()
        ),
        "codes are": dataclasses.replace(
            grid,
            codes=grid.codes[:48].contiguous(),
            scale=grid.scale[:48],
            zero_point=grid.zero_point[:48],
            bias=grid.bias[:48],
        ),
    }
    for why, g in bad.items():
        with pytest.raises(quantplug.PluginError, match=why) as info:
            quantizer.encode_grid(NAME, meta, g)
        assert NAME in str(info.value)
    two = quantplug.AutoQuantizer.from_config({"quant_method": "hqq", "nbits": 2, "group_size": 64})
    with pytest.raises(quantplug.PluginError, match="only 4 and 8-bit"):
        two.encode_grid(NAME, meta, dataclasses.replace(grid, bits=2))


def test_integer_zero_points_are_held_exactly():
    """A grid with integer (or no) zero points, e.g. from another backend, is held as hqq's float zero."""
    quantizer, qmodule, meta = _layer({"nbits": 4, "group_size": 64})
    grid = quantizer.integer_grid(NAME, qmodule)
    integer = dataclasses.replace(grid, zero_point=torch.ones_like(grid.scale, dtype=torch.int8))
    back = quantizer.integer_grid(NAME, quantizer.encode_grid(NAME, meta, integer))
    assert torch.equal(back.zero_point, torch.ones_like(grid.scale)) and torch.equal(back.codes, grid.codes)
    sym = quantizer.integer_grid(
        NAME, quantizer.encode_grid(NAME, meta, dataclasses.replace(grid, zero_point=None))
    )
    assert not sym.zero_point.any() and torch.equal(
        sym.dequantize(), dataclasses.replace(grid, zero_point=None).dequantize()
    )
