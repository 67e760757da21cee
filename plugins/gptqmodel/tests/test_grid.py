"""``integer_grid`` / ``encode_grid`` of GPTQ and AWQ layers: layers GPTQModel packed (quantplug's GPTQ
quantize, in memory and re-loaded from the checkpoint it saved; AWQ layers packed by GPTQModel's
``AwqTorchLinear.pack``, and the auto-round AWQ checkpoint of test_awq.py) read as an exact
``IntegerGrid`` that dequantizes to the layer's own weight, and are packed back into byte-identical
checkpoint tensors and a module computing the same; grids a config cannot hold are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
from safetensors.torch import load_file, save_file
from test_awq import AWQ
from torch import nn

import quantplug

IN, OUT = 128, 64


def _model(bias: bool, dtype: torch.dtype, in_f: int = IN) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_f, OUT, bias=bias)).to(dtype)


def _gptq(config: dict, bias: bool, dtype: torch.dtype, tmp_path, bias_dtype=None, in_f: int = IN):
    """A GPTQ layer quantized by quantplug (GPTQModel's GPTQ and packer), and the same layer loaded from
    the checkpoint it saved (``bias_dtype``: the bias re-stored so, as GPTQModel's own writer does)."""
    model = _model(bias, dtype, in_f)
    gen = torch.Generator().manual_seed(1)
    spread = torch.linspace(0.2, 3.0, in_f)[
        torch.randperm(in_f, generator=gen)
    ]  # act-order has an order to find
    data = [(torch.randn(256, in_f, generator=gen) * spread).to(dtype)]
    config = {"quant_method": "gptq", **config}
    quantplug.quantize(model, config, calibration_data=data, progress=False, kernel="none")
    folder = quantplug.save(model, tmp_path / "ckpt")
    if bias_dtype is not None:
        tensors = load_file(folder / "model.safetensors")
        tensors["0.bias"] = tensors["0.bias"].to(bias_dtype)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = quantplug.load(folder, model=_model(bias, dtype, in_f), progress=False, kernel="none")
    return quantplug.AutoQuantizer.from_config(config), model[0], loaded[0]


def _meta_linear(layer, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype
    )


def _check_round_trip(
    quantizer, layer, dtype: torch.dtype, own_weight: torch.Tensor, name: str = "0"
) -> quantplug.IntegerGrid:
    """(a) the grid holds together, (b) it is the layer's weight and forward, (c) re-encoded it gives the
    same tensors bit for bit, (d) and the same forward."""
    grid = quantizer.integer_grid(name, layer)
    assert isinstance(grid, quantplug.IntegerGrid), grid
    grid.check(name)
    exact = dataclasses.replace(grid, scale=grid.scale.float()).dequantize()  # (q - z) * s in float32
    # the layer's own weight is that, rounded once to its dtype
    assert torch.allclose(exact, own_weight.float(), rtol=torch.finfo(own_weight.dtype).eps, atol=0), (
        (exact - own_weight.float()).abs().max()
    )
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
    bias = grid.bias.float() if grid.bias is not None else 0
    with torch.no_grad():
        ours, theirs = x @ exact.t() + bias, layer(x.to(dtype)).float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < (2e-2 if dtype != torch.float32 else 2e-3)
    rebuilt = quantizer.encode_grid(name, _meta_linear(layer, dtype), grid)
    assert type(rebuilt) is type(layer)
    before, after = quantizer.module_tensors(name, layer), quantizer.module_tensors(name, rebuilt)
    assert before.keys() == after.keys()
    for key in before:
        assert (before[key].dtype, before[key].shape) == (after[key].dtype, after[key].shape), key
        assert torch.equal(before[key], after[key]), key
    with torch.no_grad():
        assert torch.equal(rebuilt(x.to(dtype)), layer(x.to(dtype)))
    return grid


GPTQ_CASES = [  # config, bias, model dtype, the bias as GPTQModel's writer stores it
    ({"bits": 4, "group_size": 32, "format": "gptq"}, True, torch.bfloat16, torch.float16),
    (
        {"bits": 4, "group_size": 32, "sym": False, "desc_act": True, "format": "gptq"},
        True,
        torch.bfloat16,
        None,
    ),
    (
        {"bits": 4, "group_size": 32, "sym": False, "desc_act": True, "format": "gptq_v2"},
        False,
        torch.float32,
        None,
    ),
    ({"bits": 2, "group_size": 32, "sym": False, "format": "gptq_v2"}, True, torch.float32, None),
    ({"bits": 2, "group_size": 64, "desc_act": True, "format": "gptq"}, False, torch.bfloat16, None),
    ({"bits": 8, "group_size": -1, "desc_act": True, "format": "gptq"}, True, torch.bfloat16, None),
    ({"bits": 8, "group_size": 64, "sym": False, "format": "gptq"}, True, torch.float32, None),
]


@pytest.mark.parametrize("config, bias, dtype, bias_dtype", GPTQ_CASES)
def test_gptq_grid_round_trips_bit_for_bit(config, bias, dtype, bias_dtype, tmp_path):
    quantizer, quantized, loaded = _gptq(config, bias, dtype, tmp_path, bias_dtype)
    grids = []
    for layer in (quantized, loaded):
        grid = _check_round_trip(quantizer, layer, dtype, layer.dequantize_weight().t())
        assert grid.bits == config["bits"] and grid.scale.dtype == torch.float16  # GPTQModel stores float16
        assert (grid.zero_point is None) == config.get("sym", True)
        assert grid.group_size == (config["group_size"] if config["group_size"] > 0 else IN)
        # act-order: a non-trivial g_idx read as the columns in group order, the groups full
        order = torch.arange(IN) // grid.group_size
        assert (grid.columns is not None) == (not torch.equal(layer.g_idx.long(), order))
        if config.get("desc_act") and config["group_size"] > 0:
            assert grid.columns is not None
            assert torch.equal(layer.g_idx.long()[grid.columns], order)
        grids.append(grid)
    if bias_dtype is not None:
        assert loaded.bias.dtype == grids[1].bias.dtype == bias_dtype
    assert torch.equal(grids[0].codes, grids[1].codes) and torch.equal(grids[0].scale, grids[1].scale)


@pytest.mark.parametrize("desc_act", [False, True])
def test_a_partial_last_group_is_a_grid_and_runs_the_int4_kernel(desc_act, tmp_path):
    # 96 inputs in groups of 64 (SmolLM2's 576 in groups of 128 likewise): a last group of 32
    config = {"bits": 4, "group_size": 64, "sym": False, "desc_act": desc_act, "format": "gptq"}
    quantizer, quantized, loaded = _gptq(config, True, torch.bfloat16, tmp_path, in_f=96)
    for layer in (quantized, loaded):
        grid = _check_round_trip(quantizer, layer, torch.bfloat16, layer.dequantize_weight().t())
        assert grid.group_size == 64 and tuple(grid.scale.shape) == (OUT, 2) and grid.layout.partial_group
        assert (grid.columns is not None) == desc_act
    model = _model(True, torch.bfloat16, 96)
    quantplug.load(tmp_path / "ckpt", model=model, progress=False)
    assert quantplug.kernel_choices(model) == {"0": "torch-int4-cpu"}


def _pack_awq(in_f: int, out_f: int, group: int, scale_dtype, bias: bool, seed: int):
    """An AWQ gemm layer's checkpoint tensors packed by GPTQModel's ``AwqTorchLinear.pack`` from known
    unsigned codes ``q`` and zero points ``z`` (weight = (q - z) * s), and the two."""
    gen = torch.Generator().manual_seed(seed)
    groups = in_f // group
    q = torch.randint(0, 16, (out_f, in_f), generator=gen)
    z = torch.randint(0, 16, (out_f, groups), generator=gen)
    scales = (torch.rand(out_f, groups, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    linear = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.copy_((q - z.repeat_interleave(group, 1)) * scales.float().repeat_interleave(group, 1))
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=gen).to(scale_dtype))
            linear.bias.data = linear.bias.data.to(scale_dtype)
    packer = AwqTorchLinear(
        bits=4, group_size=group, sym=False, desc_act=False, in_features=in_f, out_features=out_f, bias=bias
    )
    packer.pack(linear, scales, z)
    return {k: v.clone() for k, v in packer.state_dict().items()}, q, z


def _awq_weight(layer) -> torch.Tensor:
    """GPTQModel's own AWQ dequantization (what its kernel multiplies by), [out, in]."""
    return dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size).t()


@pytest.mark.parametrize(
    "group, scale_dtype, bias",
    [(32, torch.float16, False), (64, torch.bfloat16, True), (-1, torch.float16, True)],
)
def test_awq_layers_packed_by_gptqmodel_round_trip(group, scale_dtype, bias):
    config = {"quant_method": "awq", "bits": 4, "group_size": group}
    quantizer = quantplug.AutoQuantizer.from_config(config)
    tensors, q, z = _pack_awq(IN, OUT, group if group > 0 else IN, scale_dtype, bias, seed=group)
    layer = quantizer.load_module(
        "0", nn.Linear(IN, OUT, bias=bias, device="meta", dtype=scale_dtype), tensors
    )
    grid = _check_round_trip(quantizer, layer, scale_dtype, _awq_weight(layer))
    assert torch.equal(grid.codes, (q - 8).to(torch.int8)) and torch.equal(
        grid.zero_point, (z - 8).to(torch.int8)
    )
    assert grid.scale.dtype == scale_dtype and grid.columns is None


def test_awq_checkpoint_written_by_auto_round_round_trips():
    model = quantplug.load(AWQ, progress=False, kernel="none")
    quantizer = quantplug.AutoQuantizer.from_config(model.config.quantization_config)
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "AwqLinear"]
    assert len(layers) == 14
    for name, layer in layers:
        grid = _check_round_trip(quantizer, layer, torch.float16, _awq_weight(layer), name)
        assert grid.zero_point is not None and grid.group_size == 32


def _quantizer(**config) -> quantplug.Quantizer:
    return quantplug.AutoQuantizer.from_config(config)


ACT_ORDER_ASYM = {"bits": 4, "group_size": 32, "sym": False, "desc_act": True}


@pytest.mark.parametrize(
    "config, change, says",
    [
        ({"bits": 8}, {}, "the grid has 4-bit codes, the config 8-bit"),
        ({"group_size": 64}, {}, "group size is 32, the config's 64"),
        ({"sym": True}, {}, "it has zero points, and the config says sym=true"),
        ({"desc_act": False}, {}, r"act-order \(columns\), and the config says desc_act=false"),
        ({}, {"float_zero": True}, "zero points are floats"),
        ({}, {"bias": None}, "the grid has no bias, the layer has one"),
        ({"bits": 3}, {"bits": 3}, "3-bit packing spans int32 words"),
    ],
)
def test_gptq_grids_the_config_cannot_hold_are_refused(config, change, says, tmp_path):
    source, layer, _ = _gptq({**ACT_ORDER_ASYM, "format": "gptq"}, True, torch.float32, tmp_path)
    grid = source.integer_grid("0", layer)
    if change.get("float_zero"):
        grid = dataclasses.replace(grid, zero_point=grid.zero_point.to(grid.scale.dtype))
    if "bias" in change:
        grid = dataclasses.replace(grid, bias=None)
    if "bits" in change:
        grid = dataclasses.replace(
            grid, bits=3, codes=grid.codes.clamp(-4, 3), zero_point=grid.zero_point.clamp(-4, 3)
        )
    target = _quantizer(quant_method="gptq", **{**ACT_ORDER_ASYM, **config})
    with pytest.raises(
        quantplug.PluginError, match=f"down_proj: GPTQ .* cannot hold its integer grid: .*{says}"
    ):
        target.encode_grid("down_proj", _meta_linear(layer, torch.float32), grid)


def test_gptq_layers_that_are_not_grids_say_why(tmp_path):
    quantizer, layer, loaded = _gptq({**ACT_ORDER_ASYM, "format": "gptq"}, False, torch.float32, tmp_path)
    labelled_sym = _quantizer(quant_method="gptq", **{**ACT_ORDER_ASYM, "sym": True})
    assert "says sym=true, but not every zero point is the middle code 8" in labelled_sym.integer_grid(
        "0", layer
    )
    no_act_order = _quantizer(quant_method="gptq", **{**ACT_ORDER_ASYM, "desc_act": False})
    assert (
        "g_idx puts inputs out of group order, but its config says desc_act=false"
        in no_act_order.integer_grid("0", layer)
    )
    g_idx = loaded.g_idx
    g_idx[int((g_idx == 1).nonzero()[0])] = 0  # group 0 gets 33 inputs, group 1 31
    assert "does not put 32 inputs in each of its 4 groups" in quantizer.integer_grid("0", loaded)
    assert "Linear is not a GPTQ layer" in quantizer.integer_grid("0", nn.Linear(IN, OUT))
    three, layer3, _ = _gptq({"bits": 3, "group_size": 32}, False, torch.float32, tmp_path / "3")
    assert "3-bit GPTQ packing spans int32 words" in three.integer_grid("0", layer3)


def test_symmetric_grids_are_held_by_asymmetric_layouts(tmp_path):
    """A grid without zero points is stored with the middle zero point: the same weights."""
    gptq, layer, _ = _gptq({"bits": 4, "group_size": 32, "format": "gptq"}, True, torch.float32, tmp_path)
    grid = gptq.integer_grid("0", layer)
    assert grid.zero_point is None
    for config in (
        {"quant_method": "gptq", **ACT_ORDER_ASYM},
        {"quant_method": "awq", "bits": 4, "group_size": 32},
    ):
        target = quantplug.AutoQuantizer.from_config(config)
        again = target.integer_grid("0", target.encode_grid("0", _meta_linear(layer, torch.float32), grid))
        assert not again.zero_point.any() and torch.equal(again.dequantize(), grid.dequantize()), config


def test_awq_grids_the_config_cannot_hold_are_refused():
    quantizer = _quantizer(quant_method="awq", bits=4, group_size=32)
    tensors, _, _ = _pack_awq(IN, OUT, 32, torch.float16, True, seed=5)
    layer = quantizer.load_module("0", nn.Linear(IN, OUT, device="meta", dtype=torch.float16), tensors)
    grid = quantizer.integer_grid("0", layer)
    meta = _meta_linear(layer, torch.float16)
    bad = {
        "group size is 32, the config's 64": (_quantizer(quant_method="awq", bits=4, group_size=64), grid),
        "act-order": (quantizer, dataclasses.replace(grid, columns=torch.randperm(IN))),
        "zero points are floats": (quantizer, dataclasses.replace(grid, zero_point=grid.zero_point.half())),
        "the grid has 2-bit codes, the config 4-bit": (
            quantizer,
            dataclasses.replace(
                grid, bits=2, codes=grid.codes.clamp(-2, 1), zero_point=grid.zero_point.clamp(-2, 1)
            ),
        ),
    }
    for says, (target, wrong) in bad.items():
        with pytest.raises(
            quantplug.PluginError, match=f"q_proj: AWQ gemm .* cannot hold its integer grid: .*{says}"
        ):
            target.encode_grid("q_proj", meta, wrong)
    gptq_layer = _quantizer(quant_method="gptq", bits=4, group_size=32).encode_grid(
        "0", meta, dataclasses.replace(grid, zero_point=None, codes=grid.codes)
    )
    assert "GptqLinear is not an AWQ layer" in quantizer.integer_grid("0", gptq_layer)
