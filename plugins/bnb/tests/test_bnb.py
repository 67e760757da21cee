"""Behaviour specific to the bitsandbytes backend, beyond the conformance kit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug_bnb import SUPPORTED_BITSANDBYTES, BnbConfig

NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def _quantizer(**cfg):
    return quantplug.AutoQuantizer.from_config(BnbConfig(**cfg))


def _layer(in_f=256, out_f=128, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_f, out_f).eval()
    torch.nn.init.normal_(layer.weight, std=0.02)
    return layer


# -- config -----------------------------------------------------------------------------------


def test_for_bits():
    assert BnbConfig.for_bits(4) == BnbConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert BnbConfig.for_bits(8) == BnbConfig(load_in_8bit=True)
    assert BnbConfig.for_bits(4, bnb_4bit_quant_type="fp4").bnb_4bit_quant_type == "fp4"
    assert BnbConfig.for_bits(4).bits == 4 and BnbConfig.for_bits(8).bits == 8
    with pytest.raises(quantplug.ConfigError, match="4 or 8") as err:
        BnbConfig.for_bits(2)
    assert err.value.field == "bits"


def test_neither_bit_width_says_what_to_set():
    with pytest.raises(quantplug.ConfigError, match="load_in_4bit=True|load_in_4bit / load_in_8bit"):
        BnbConfig()


def test_skip_modules_is_one_setting_under_two_names():
    a = BnbConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "fc"])
    b = BnbConfig(load_in_8bit=True, modules_to_not_convert=["lm_head", "fc"])
    assert a == b
    assert a.modules_to_not_convert == a.llm_int8_skip_modules == ("lm_head", "fc")
    assert BnbConfig.from_dict(a.to_dict()) == a
    default = BnbConfig(load_in_8bit=True)
    assert default.modules_to_not_convert is None and default.llm_int8_skip_modules is None


def test_null_dtypes_mean_transformers_defaults():
    cfg = BnbConfig(load_in_4bit=True, bnb_4bit_compute_dtype=None, bnb_4bit_quant_storage=None)
    assert cfg == BnbConfig(load_in_4bit=True)
    assert (cfg.bnb_4bit_compute_dtype, cfg.bnb_4bit_quant_storage) == ("float32", "uint8")


def test_transformers_private_keys_must_agree():
    data = {"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False}
    assert quantplug.config_from_dict(data) == BnbConfig(load_in_4bit=True)
    with pytest.raises(quantplug.ConfigError, match="_load_in_4bit") as err:
        quantplug.config_from_dict({**data, "load_in_4bit": False, "load_in_8bit": True})
    assert err.value.field == "load_in_4bit"


# -- layers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,cls",
    [
        ({"load_in_8bit": True}, "Linear8bitLt"),
        (NF4, "Linear4bit"),
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, "Linear4bit"),
    ],
)
def test_uses_bitsandbytes_own_modules(cfg, cls):
    q = _quantizer(**cfg)
    layer = _layer()
    qlayer = q.quantize_module("layer", layer)
    assert type(qlayer) is getattr(bnb.nn, cls)
    assert not qlayer.training  # follows the layer it replaces
    tensors = q.module_tensors("layer", qlayer)
    spec = q.expected_tensors("layer", layer)
    assert tensors.keys() == spec.keys()
    for key, (shape, dtype) in spec.items():
        assert shape is None or tuple(tensors[key].shape) == shape, key
        assert dtype is None or tensors[key].dtype == dtype, key
    assert all(type(t) is torch.Tensor for t in tensors.values())


@pytest.mark.parametrize(
    "cfg",
    [NF4, {**NF4, "bnb_4bit_use_double_quant": True}, {"load_in_4bit": True}, {"load_in_8bit": True}],
    ids=["nf4", "nf4-dq", "fp4", "int8"],
)
def test_checkpoint_tensors_do_not_change_with_forwards(cfg):
    # bitsandbytes repacks 4-bit layers for its CPU kernel on the first eval forward (AVX512-BF16
    # CPUs) and its state_dict() is then wrong; the stored tensors must stay the quantized ones.
    q = _quantizer(**cfg)
    qlayer = q.quantize_module("layer", _layer())
    before = {k: v.clone() for k, v in q.module_tensors("layer", qlayer).items()}
    x = torch.randn(4, 256)
    with torch.no_grad():
        first = qlayer(x)
        after = q.module_tensors("layer", qlayer)
        second = qlayer(x)
    assert torch.equal(first, second)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rebuilt = q.load_module("layer", torch.nn.Linear(256, 128, device="meta"), after).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), first)


@pytest.mark.parametrize("cfg", [NF4, {"load_in_8bit": True}], ids=["nf4", "int8"])
def test_qlora_adapter_trains_on_frozen_bnb_layer(cfg):
    qlayer = _quantizer(**cfg).quantize_module("layer", _layer()).train()
    torch.manual_seed(1)
    lora_a = torch.nn.Parameter(torch.randn(8, 256) * 0.01)
    lora_b = torch.nn.Parameter(torch.zeros(128, 8))
    opt = torch.optim.Adam([lora_a, lora_b], lr=1e-2)
    x, target = torch.randn(16, 256, requires_grad=True), torch.randn(16, 128)
    losses = []
    for _ in range(5):
        y = qlayer(x) + (x @ lora_a.t()) @ lora_b.t()
        loss = (y - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(not p.requires_grad for p in qlayer.parameters())
    assert lora_b.grad.abs().sum() > 0 and x.grad.abs().sum() > 0  # gradients flow through the bnb kernel
    assert losses[-1] < losses[0]


# -- models and checkpoints --------------------------------------------------------------------


def test_quantize_on_load_equals_quantize(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    model = tiny_llama()
    quantplug.quantize(model, BnbConfig.for_bits(4), progress=False)
    loaded = quantplug.load(tmp_path / "fp", config=BnbConfig.for_bits(4), progress=False)
    assert torch.equal(logits(loaded, token_ids()), logits(model, token_ids()))


def _saved(tmp_path, cfg):
    model = tiny_llama()
    quantplug.quantize(model, BnbConfig(**cfg), progress=False)
    return quantplug.save(model, tmp_path / "ckpt")


def test_wrong_quant_type_in_config_is_a_clear_error(tmp_path):
    ckpt = _saved(tmp_path, NF4)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(quantplug.CheckpointError, match="bitsandbytes__fp4"):
        quantplug.load(ckpt, progress=False)


def test_quant_state_of_another_layer_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _saved(tmp_path, NF4)
    tensors = load_file(ckpt / "model.safetensors")
    blob = "weight.quant_state.bitsandbytes__nf4"
    tensors[f"model.layers.0.self_attn.q_proj.{blob}"] = tensors[
        f"model.layers.0.mlp.gate_proj.{blob}"
    ].clone()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(quantplug.CheckpointError, match="q_proj.*weight shape"):
        quantplug.load(ckpt, progress=False)


def test_unknown_int8_weight_format_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _saved(tmp_path, {"load_in_8bit": True})
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_format"] = torch.tensor(1, dtype=torch.uint8)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(quantplug.CheckpointError, match="up_proj.weight_format"):
        quantplug.load(ckpt, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_cuda():
    with pytest.raises(quantplug.BackendUnavailableError, match="no CUDA device"):
        _quantizer(**NF4).validate_environment("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cfg", [NF4, {"load_in_8bit": True}], ids=["nf4", "int8"])
def test_cuda_quantize_save_load(cfg, tmp_path):
    model = tiny_llama().to("cuda")
    quantplug.quantize(model, BnbConfig(**cfg), progress=False)
    ids = token_ids().to("cuda")
    expected = logits(model, ids)
    quantplug.save(model, tmp_path / "ckpt")
    loaded = quantplug.load(tmp_path / "ckpt", device="cuda", progress=False)
    assert torch.equal(logits(loaded, ids), expected)


# -- listing and the supported library range -----------------------------------------------------


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "quantplug.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_list_shows_backend_available_with_library_version():
    proc = _cli("list", "--json")
    assert proc.returncode == 0, proc.stderr
    entry = next(b for b in json.loads(proc.stdout)["backends"] if b["name"] == "bitsandbytes")
    assert entry["available"] is True
    assert entry["libraries"] == {"bitsandbytes": bnb.__version__}
    assert entry["plugin"] == "quantplug-bnb"
    table = _cli("list").stdout
    row = next(line for line in table.splitlines() if line.startswith("bitsandbytes"))
    assert f"bitsandbytes {bnb.__version__}" in row and " available " in row


def test_doctor_reports_bitsandbytes_outside_supported_range(tmp_path):
    # An installed bitsandbytes whose metadata says 0.40.0 (found before the real one on sys.path).
    dist = tmp_path / "bitsandbytes-0.40.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.40.0\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = _cli("doctor", env=env)
    out = proc.stdout + proc.stderr
    assert "bitsandbytes 0.40.0" in out
    assert f"pip install '{SUPPORTED_BITSANDBYTES}'" in out  # as declared: lower bound first
    listing = _cli("list", env=env).stdout
    row = next(line for line in listing.splitlines() if line.startswith("bitsandbytes"))
    assert "unavailable" in row
