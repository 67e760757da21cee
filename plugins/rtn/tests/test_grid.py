"""``integer_grid`` / ``encode_grid`` of rtn layers: symmetric layers (int8 per channel, int4 / int2
group-wise, a partial last group) and the integer-zero layout of
checkpoints written before the min/max one read as an exact ``IntegerGrid`` that dequantizes to the
layer's weight, and are rebuilt into byte-identical tensors and a module computing the same; the
min/max layout and grids a config cannot hold are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import quantplug
from quantplug.testing import tiny_llama, token_ids
from quantplug_rtn import RtnConfig
from quantplug_rtn.quantizer import RtnLinear, pack


def _layer(config: RtnConfig, shape=(96, 256), dtype=torch.bfloat16, bias=True) -> RtnLinear:
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias).to(dtype)
    return RtnLinear.from_linear(linear, config)


def _integer_zero(layer: RtnLinear, seed: int = 0) -> RtnLinear:
    """``layer`` (asymmetric) turned into the layout written before the min/max one: uint8 ``zero``
    per group, codes padded with the last group's zero point (weight 0), as that quantizer wrote."""
    gen = torch.Generator().manual_seed(seed)
    levels = (1 << layer.bits) - 1
    zero = torch.randint(0, levels + 1, tuple(layer.scale.shape), generator=gen).to(torch.uint8)
    codes = torch.randint(0, levels + 1, (layer.out_features, layer.in_features), generator=gen).to(
        torch.uint8
    )
    padded = layer.scale.shape[1] * layer.group_size
    codes = torch.cat([codes, zero[:, -1:].expand(-1, padded - layer.in_features)], 1)
    layer.qweight.copy_(pack(codes, layer.bits))
    layer.zero = zero
    assert layer.integer_zero
    return layer


def _quantizer(config: RtnConfig):
    return quantplug.AutoQuantizer.from_config(config)


def _meta(layer: RtnLinear, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype
    )


CASES = {
    "int8-per-channel": (RtnConfig(bits=8, group_size=-1), (96, 256)),
    "int4-g32": (RtnConfig(bits=4, group_size=32), (96, 256)),
    "int4-g128-partial": (RtnConfig(bits=4, group_size=128), (96, 576)),  # 576 = 4.5 groups of 128
    "int4-g256-partial": (RtnConfig(bits=4, group_size=256), (64, 320)),
    "int2-g64": (RtnConfig(bits=2, group_size=64), (96, 256)),
    "int4-g32-integer-zero": (RtnConfig(bits=4, group_size=32, symmetric=False), (96, 256)),
    "int4-g64-integer-zero-partial": (RtnConfig(bits=4, group_size=64, symmetric=False), (64, 288)),
    "int2-g32-integer-zero": (RtnConfig(bits=2, group_size=32, symmetric=False), (96, 256)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_layer_is_its_grid_and_is_rebuilt_from_it_bit_for_bit(case, dtype):
    config, shape = CASES[case]
    layer = _layer(config, shape, dtype)
    if not config.symmetric:
        layer = _integer_zero(layer)
    quantizer = _quantizer(config)
    grid = quantizer.integer_grid("layer", layer)
    assert isinstance(grid, quantplug.IntegerGrid), grid
    grid.check("layer")  # (a)
    expected_group = shape[1] if config.group_size == -1 else config.group_size  # a partial last group too
    assert grid.group_size == expected_group and grid.bits == config.bits
    assert grid.scale.dtype == dtype and (grid.zero_point is None) == config.symmetric
    # (b) the grid's weight is the layer's (both computed in the scale dtype, compared in float32)
    assert torch.equal(grid.dequantize().float(), layer.dequantize().float())
    # (c) rebuilt from the grid: the same tensors, keys, dtypes and shapes, bit for bit
    rebuilt = quantizer.encode_grid("layer", _meta(layer, dtype), grid)
    a, b = quantizer.module_tensors("layer", rebuilt), quantizer.module_tensors("layer", layer)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    # (d) and the same forward
    x = torch.randn(3, shape[1], dtype=dtype)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), layer(x))


def test_the_min_max_layout_is_refused_with_the_reason_and_a_partial_last_group_is_a_grid():
    quantizer = _quantizer(RtnConfig(bits=4, group_size=32, symmetric=False))
    why = quantizer.integer_grid("layer", _layer(RtnConfig(bits=4, group_size=32, symmetric=False)))
    assert isinstance(why, str) and "min/max layout" in why and "bit for bit" in why
    config = RtnConfig(bits=4, group_size=32)
    layer = _layer(config, (64, 130))  # 4 whole groups of 32 and one of 2
    grid = _quantizer(config).integer_grid("layer", layer)
    grid.check("layer")
    assert grid.group_size == 32 and tuple(grid.scale.shape) == (64, 5) and grid.layout.partial_group
    torch.testing.assert_close(grid.dequantize().float(), layer.dequantize().float(), rtol=0, atol=0)
    assert "is not an RtnLinear" in _quantizer(config).integer_grid("layer", nn.Linear(4, 4))


def _grid(config: RtnConfig, shape=(96, 256)) -> tuple[quantplug.IntegerGrid, nn.Linear]:
    layer = _layer(config, shape)
    return _quantizer(config).integer_grid("layer", layer), _meta(layer, torch.bfloat16)


def _replace(grid: quantplug.IntegerGrid, **fields) -> quantplug.IntegerGrid:
    values = {
        k: getattr(grid, k) for k in ("codes", "scale", "zero_point", "bits", "group_size", "bias", "columns")
    }
    return quantplug.IntegerGrid(**{**values, **fields})


def test_grids_the_config_cannot_hold_are_refused_naming_the_layer_and_why():
    config = RtnConfig(bits=4, group_size=32)
    grid, meta = _grid(config)
    quantizer = _quantizer(config)
    out_f, groups = grid.scale.shape
    bad = {
        "3-bit codes, the config has bits=4": _replace(grid, bits=3),
        "group size 64, the config's layers have 32": _replace(grid, group_size=64, scale=grid.scale[:, ::2]),
        "act-order": _replace(grid, columns=torch.arange(256).flip(0)),
        "the grid is with zero points, the config has symmetric=True": _replace(
            grid, zero_point=torch.zeros(out_f, groups, dtype=torch.int8)
        ),
        "float zero points": _replace(grid, zero_point=torch.zeros(out_f, groups, dtype=torch.bfloat16)),
        "codes [96, 128] for a layer of [96, 256]": _replace(grid, codes=grid.codes[:, :128]),
    }
    for why, g in bad.items():
        with pytest.raises(quantplug.PluginError, match="'layer'") as err:
            quantizer.encode_grid("layer", meta, g)
        assert why in str(err.value), (why, str(err.value))
    asym = RtnConfig(bits=4, group_size=32, symmetric=False)
    with pytest.raises(quantplug.PluginError, match="the grid is symmetric, the config has symmetric=False"):
        _quantizer(asym).encode_grid("layer", meta, grid)


def test_a_legacy_integer_zero_checkpoint_in_bfloat16_loads_onto_kernels_and_saves_byte_identical(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    config = RtnConfig(bits=4, group_size=32, symmetric=False)
    quantplug.quantize(model, config, progress=False)
    for seed, layer in enumerate(m for m in model.modules() if isinstance(m, RtnLinear)):
        _integer_zero(layer, seed)
    ids = token_ids()
    with torch.no_grad():
        ref = model(ids).logits.float()
    folder = quantplug.save(model, tmp_path / "legacy")
    loaded = quantplug.load(folder, progress=False)
    choices = quantplug.kernel_choices(loaded)
    if quantplug.available_kernels()["torch-int4-cpu"].machine_problem() is None:
        assert set(choices.values()) == {"torch-int4-cpu"}
    with torch.no_grad():
        got = loaded(ids).logits.float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.02  # kernel vs dequantized, bf16 rounding apart
    again = quantplug.save(loaded, tmp_path / "again")
    a, b = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.mlp.down_proj.zero"].dtype == torch.uint8
