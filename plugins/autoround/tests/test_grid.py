"""``integer_grid`` / ``encode_grid`` of auto-round layers: layers auto-round packed (quantplug's
quantize, and a checkpoint written by auto-round's own ``quantize_and_save``) read as an exact
``IntegerGrid`` that dequantizes to the layer's own weight, and packed back into byte-identical
checkpoint tensors and a module computing the same; grids a layer cannot hold are refused."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from torch import nn

import quantplug
from quantplug.testing import tiny_llama, token_ids

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def _quantized(settings: dict, **model_overrides):
    model = tiny_llama(**model_overrides)
    config = {"quant_method": "auto-round", "iters": 0, **settings}
    quantplug.quantize(
        model, config, calibration_data=[token_ids(shape=(2, 16), seed=4)], progress=False, kernel="none"
    )
    return model, quantplug.AutoQuantizer.from_config(config)


def _meta_linear(layer) -> nn.Linear:
    tensors = layer._quantplug_checkpoint
    out_f = tensors["scales"].shape[1]
    in_f = layer.infeatures if hasattr(layer, "infeatures") else layer.in_features
    return nn.Linear(in_f, out_f, bias="bias" in tensors, device="meta")


def _weight(layer) -> torch.Tensor:
    """The layer's own weight [out, in] in float32, read off its forward (bias taken off)."""
    in_f = _meta_linear(layer).in_features
    eye = torch.eye(in_f, dtype=torch.float16 if "QuantLinearAWQ" in type(layer).__name__ else torch.float32)
    with torch.no_grad():
        out = layer(eye).float()
        zero = layer(torch.zeros_like(eye[:1])).float()
    return (out - zero).t()


def _check_layer(quantizer, name: str, layer) -> quantplug.IntegerGrid:
    grid = quantizer.integer_grid(name, layer)
    assert isinstance(grid, quantplug.IntegerGrid), grid
    grid.check(name)
    scheme = quantizer.config.layer_scheme(name)
    assert grid.bits == scheme["bits"]
    assert (grid.zero_point is None) == scheme["sym"]
    weight = grid.dequantize().float()
    own = _weight(layer)
    assert ((weight - own).norm() / own.norm()).item() < 2e-3
    rebuilt = quantizer.encode_grid(name, _meta_linear(layer), grid)
    before, after = quantizer.module_tensors(name, layer), quantizer.module_tensors(name, rebuilt)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and before[key].shape == after[key].shape, key
        assert torch.equal(before[key], after[key]), key
    assert type(rebuilt) is type(layer)
    x = torch.randn(3, grid.codes.shape[1], dtype=_weight_dtype(layer))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), layer(x))
    return grid


def _weight_dtype(layer) -> torch.dtype:
    return torch.float16 if "QuantLinearAWQ" in type(layer).__name__ else torch.float32


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 8, "group_size": 32},  # auto_round:auto_gptq, auto-round's torch backend
        {"bits": 8, "group_size": -1},  # per channel
        {"bits": 2, "group_size": 32, "sym": False},  # auto_round packing (zero points as stored)
        {"bits": 4, "group_size": 64, "sym": False},  # auto_round:auto_awq, auto-round-lib's kernel
    ],
    ids=["int8-g32-gptq", "int8-channel-gptq", "int2-g32-asym", "int4-g64-awq"],
)
def test_quantized_layers_round_trip(settings):
    model, quantizer = _quantized(settings, attention_bias=settings["group_size"] == 32)
    for name in LAYERS:
        _check_layer(quantizer, name, model.get_submodule(name))


def test_checkpoint_written_by_auto_round_round_trips(tmp_path):
    """A folder from auto-round's own quantize_and_save (sym int4, groups of 32) loads into layers
    whose grids re-encode to the very tensors of the folder."""
    from auto_round import AutoRound
    from safetensors.torch import load_file

    model = tiny_llama()
    model.config.architectures = ["LlamaForCausalLM"]
    tokenizer = types.SimpleNamespace(pad_token_id=None, pad_token=None)
    data = [token_ids(shape=(1, 16), seed=10 + i) for i in range(2)]
    ar = AutoRound(
        model,
        tokenizer,
        bits=4,
        group_size=32,
        sym=True,
        iters=0,
        disable_opt_rtn=True,  # auto-round's optimized RTN of sym int4 takes ~25 s here
        nsamples=2,
        seqlen=16,
        dataset=data,
        device_map="cpu",
        enable_torch_compile=False,
    )
    ar.quantize_and_save(str(tmp_path / "ar"), format="auto_round")
    folder = next(p.parent for p in (tmp_path / "ar").rglob("config.json"))
    stored = {}
    for f in folder.glob("*.safetensors"):
        stored.update(load_file(f))
    loaded = quantplug.load(folder, progress=False, kernel="none")
    quantizer = quantplug.AutoQuantizer.from_config(
        json.loads((folder / "config.json").read_text())["quantization_config"]
    )
    for name in LAYERS:
        layer = loaded.get_submodule(name)
        grid = _check_layer(quantizer, name, layer)
        tensors = quantizer.module_tensors(name, quantizer.encode_grid(name, _meta_linear(layer), grid))
        for key, value in tensors.items():
            assert torch.equal(value, stored[f"{name}.{key}"]), key


def test_bad_grids_are_refused():
    model, quantizer = _quantized({"bits": 8, "group_size": 32})  # sym int4 RTN is slow in auto-round
    name = LAYERS[0]
    layer = model.get_submodule(name)
    grid = quantizer.integer_grid(name, layer)
    meta = _meta_linear(layer)
    in_f = grid.codes.shape[1]
    bad = {
        "is 4-bit": dataclasses.replace(grid, bits=4, codes=grid.codes // 16),
        "groups of 64": dataclasses.replace(grid, group_size=64, scale=grid.scale[:, ::2].contiguous()),
        "act-order": dataclasses.replace(grid, columns=torch.arange(in_f).flip(0)),
        "symmetric": dataclasses.replace(grid, zero_point=torch.ones_like(grid.scale, dtype=torch.int8)),
        "float zero": dataclasses.replace(grid, zero_point=torch.full_like(grid.scale, 0.5)),
        "has a bias": dataclasses.replace(grid, bias=torch.zeros(grid.codes.shape[0])),
        "not exact in torch.float16": dataclasses.replace(grid, scale=grid.scale.double() * (1 + 1e-6)),
    }
    for why, g in bad.items():
        with pytest.raises(quantplug.PluginError, match=why) as info:
            quantizer.encode_grid(name, meta, g)
        assert name in str(info.value)
    asym = quantplug.AutoQuantizer.from_config(
        {
            "quant_method": "auto-round",
            "bits": 4,
            "group_size": 32,
            "sym": False,
            "packing_format": "auto_round:auto_gptq",
        }
    )
    lowest = dataclasses.replace(
        grid, bits=4, codes=grid.codes // 16, zero_point=torch.full_like(grid.scale, -8, dtype=torch.int8)
    )
    with pytest.raises(quantplug.PluginError, match=r"zero - 1"):
        asym.encode_grid(name, meta, lowest)
    assert "is not an auto-round layer" in quantizer.integer_grid(name, nn.Linear(4, 4))

    for bits in (3, 5):  # packings this plugin does not decode: a reason, before any tensor is read
        odd = quantplug.AutoQuantizer.from_config(
            {"quant_method": "auto-round", "bits": bits, "group_size": 32}
        )
        why = odd.integer_grid(name, layer)
        assert isinstance(why, str) and f"{bits}-bit codes straddle int32 words" in why
