"""HQQ-specific behaviour beyond the conformance kit: quality against plain rounding, per-layer
configs, refusals that name the layer, and the safetensors layout (no pickle, metadata checked)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug_hqq import HqqConfig

DOCUMENTED_KEYS = {
    "W_q",
    "scale",
    "zero",
    "bias",
    "nbits",
    "group_size",
    "axis",
    "shape",
    "packing",
    "unpack_view_dtype",
    "compute_dtype",
    "view_as_float",
    "quant_scale",
    "quant_zero",
    "offload_meta",
    "encoded_state_dict",
    "stores_quant_config",
    "channel_wise",
    "optimize",
    "round_zero",
}


def _layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 256)
    torch.nn.init.normal_(layer.weight, std=0.02)
    return layer, torch.randn(32, 512)


def _rel(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("nbits", [4, 3, 2])
def test_optimizer_beats_plain_rounding_on_the_same_grid(nbits):
    """HQQ's half-quadratic optimizer (what the plugin runs) against hqq with optimize=False, i.e.
    plain round-to-nearest with the same groups and min/max scale/zero."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    layer, x = _layer()
    with torch.no_grad():
        ref = layer(x)
        quantizer = quantplug.AutoQuantizer.from_config(HqqConfig(nbits=nbits, group_size=64))
        hqq_err = _rel(quantizer.quantize_module("layer", layer)(x), ref)
        plain_cfg = BaseQuantizeConfig(nbits=nbits, group_size=64, axis=1)
        plain_cfg["weight_quant_params"]["optimize"] = False
        plain = HQQLinear.from_weights(
            layer.weight.detach(), None, plain_cfg, compute_dtype=torch.float32, device="cpu"
        )
        plain_err = _rel(plain(x) + layer.bias, ref)
    assert hqq_err < plain_err, f"HQQ {hqq_err:.4f} vs plain rounding {plain_err:.4f} at {nbits} bits"


def test_one_bit_layer_within_declared_bound():
    layer, x = _layer()
    bound = quantplug.get_backend("hqq").capabilities.max_rel_error[1]
    quantizer = quantplug.AutoQuantizer.from_config(HqqConfig(nbits=1, group_size=64))
    with torch.no_grad():
        qlayer = quantizer.quantize_module("layer", layer)
        rel = _rel(qlayer(x), layer(x))
    assert rel <= bound
    packed = quantizer.module_tensors("layer", qlayer)["W_q"]
    assert packed.dtype == torch.uint8 and packed.numel() * 8 == layer.weight.numel()


def test_quantizing_leaves_the_source_layer_intact():
    layer, _ = _layer()
    before = layer.weight.detach().clone()
    quantplug.AutoQuantizer.from_config(HqqConfig(nbits=4)).quantize_module("layer", layer)
    assert layer.weight is not None and torch.equal(layer.weight, before)


def test_group_size_not_dividing_in_features_is_refused_naming_the_layer():
    model = tiny_llama()
    with pytest.raises(quantplug.ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj") as err:
        quantplug.quantize(model, HqqConfig(nbits=4, group_size=48), progress=False)
    assert err.value.field == "group_size"
    assert "does not divide" in str(err.value) and "skip_modules" in str(err.value)
    # refused while planning: nothing was replaced
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_group_size_not_dividing_one_layer_can_be_skipped():
    model = tiny_llama(intermediate_size=320)  # down_proj in_features 320: 320 % 128 != 0
    with pytest.raises(quantplug.ConfigError, match=r"mlp\.down_proj"):
        quantplug.quantize(model, HqqConfig(nbits=4, group_size=128), progress=False)
    report = quantplug.quantize(
        model, HqqConfig(nbits=4, group_size=128, skip_modules=("lm_head", "mlp.down_proj")), progress=False
    )
    assert report.skipped["model.layers.0.mlp.down_proj"] == "listed in skip_modules"
    assert "model.layers.0.mlp.up_proj" in report.converted


def test_unsupported_dtype_is_refused_naming_the_layer():
    layer = torch.nn.Linear(128, 64, dtype=torch.float64)
    quantizer = quantplug.AutoQuantizer.from_config(HqqConfig(nbits=4))
    with pytest.raises(quantplug.ConfigError, match="'proj'.*float64"):
        quantizer.quantize_module("proj", layer)


def test_dynamic_config_per_layer_settings_and_round_trip(tmp_path):
    from hqq.core.quantize import HQQLinear

    config = HqqConfig(
        dynamic_config={
            "self_attn.q_proj": {"nbits": 2, "group_size": 32},
            "mlp.down_proj": {"nbits": 8, "group_size": 128},
        }
    )
    assert HqqConfig.from_json(config.to_json()) == config
    model = tiny_llama()
    ids = token_ids()
    report = quantplug.quantize(model, config, progress=False)
    assert sorted(report.converted) == sorted(
        f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert "dynamic_config" in report.skipped["model.layers.0.self_attn.k_proj"]
    q = model.model.layers[1].self_attn.q_proj
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(q, HQQLinear) and q.meta["nbits"] == 2 and q.meta["group_size"] == 32
    assert down.meta["nbits"] == 8 and down.meta["group_size"] == 128
    out = logits(model, ids)

    ckpt = quantplug.save(model, tmp_path / "ckpt")
    saved = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hqq" and saved["dynamic_config"] == config.dynamic_config
    loaded = quantplug.load(ckpt, progress=False)
    assert loaded.model.layers[1].self_attn.q_proj.meta["nbits"] == 2
    assert torch.equal(logits(loaded, ids), out)


def test_checkpoint_is_safetensors_with_the_documented_layout(tmp_path):
    model = tiny_llama()
    quantplug.quantize(model, HqqConfig(nbits=4, group_size=64), progress=False)
    ckpt = quantplug.save(model, tmp_path / "ckpt")
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    raw = (ckpt / "model.safetensors").read_bytes()
    assert b"\x80\x04" not in raw[:8] and not raw.startswith(b"PK")  # not a pickle / torch zip
    prefix = "model.layers.0.self_attn.q_proj."
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        keys = {k[len(prefix) :] for k in names if k.startswith(prefix)}
        assert keys == DOCUMENTED_KEYS - {"bias"}  # Llama's projections have no bias
        assert f.get_tensor(prefix + "W_q").dtype == torch.uint8
        assert f.get_tensor(prefix + "shape").tolist() == [128, 128]
        assert bytes(f.get_tensor(prefix + "packing").tolist()) == b"4bit_u8"
        assert bytes(f.get_tensor(prefix + "compute_dtype").tolist()) == b"torch.float32"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"] == HqqConfig(nbits=4, group_size=64).to_dict()


def test_loading_unpickles_nothing_and_decodes_no_metadata(tmp_path, monkeypatch):
    import pickle

    import hqq.core.quantize
    import hqq.core.utils

    model = tiny_llama()
    ids = token_ids()
    quantplug.quantize(model, HqqConfig(nbits=4, group_size=64), progress=False)
    out = logits(model, ids)
    ckpt = quantplug.save(model, tmp_path / "ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("called while loading an HQQ checkpoint")

    for obj, attr in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (hqq.core.utils, "decode_safetensor_type"),  # hqq's decoder eval()s stored strings
        (hqq.core.quantize, "decode_safetensor_type"),
    ]:
        monkeypatch.setattr(obj, attr, refuse)
    assert torch.equal(logits(quantplug.load(ckpt, progress=False), ids), out)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("nbits", torch.tensor(3, dtype=torch.int32)),
        # same length as "torch.float32", never eval'd
        ("compute_dtype", torch.tensor(list(b"print('pwn')1"), dtype=torch.uint8)),
    ],
)
def test_tampered_metadata_is_refused_without_evaluating_it(tmp_path, key, value, capsys):
    model = tiny_llama()
    quantplug.quantize(model, HqqConfig(nbits=4, group_size=64), progress=False)
    ckpt = quantplug.save(model, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.up_proj"
    tensors[f"{name}.{key}"] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(quantplug.CheckpointError, match=rf"{name}.*{key}"):
        quantplug.load(ckpt, progress=False)
    assert "pwn" not in capsys.readouterr().out


def test_loaded_model_reports_the_same_config_and_resaves(tmp_path):
    model = tiny_llama()
    config = HqqConfig(nbits=3, group_size=32, skip_modules=("lm_head", "self_attn.o_proj"))
    report = quantplug.quantize(model, config, progress=False)
    assert report.skipped["model.layers.0.self_attn.o_proj"] == "listed in skip_modules"
    first = quantplug.save(model, tmp_path / "a")
    loaded = quantplug.load(first, progress=False)
    second = quantplug.save(loaded, tmp_path / "b")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
