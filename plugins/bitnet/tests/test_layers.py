"""BitNet layers on their own: the kernel against the plain matmul, gradients, and what a bad
checkpoint or config is told."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from quantplug_bitnet import modules, packing
from quantplug_bitnet.quantizer import BitNetQuantizer
from safetensors.torch import load_file, save_file

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids


def quantizer(**config) -> BitNetQuantizer:
    return quantplug.AutoQuantizer.from_config(
        quantplug.config_from_dict({"quant_method": "bitnet", **config})
    )


def layer(out_f=256, in_f=512, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    torch.nn.init.normal_(lin.weight, std=0.02)
    return lin


@pytest.mark.parametrize("int_mm", [True, False], ids=["int_mm", "int4-kernel"])
@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
@pytest.mark.parametrize("rows", [1, 7, 200])  # decode, a short prompt, past the int4 kernel's dense_from
def test_integer_paths_match_the_plain_matmul(linear_class, rows, int_mm):
    """bfloat16: torch._int_mm and the int4 kernel (or its dense path) compute what the ternary
    weights compute in float32, where neither runs."""
    torch.manual_seed(0)
    lin = layer(dtype=torch.bfloat16)
    codes, scale = packing.ternarize(lin.weight)
    bf16 = modules.BitNetLinear(512, 256, linear_class=linear_class, bias=True, dtype=torch.bfloat16)
    bf16.weight_scale.fill_(float(scale))
    bf16.bias.copy_(lin.bias)
    bf16.set_codes(codes, torch.bfloat16, int_mm=int_mm)
    assert bf16.kernel == ("torch._int_mm" if int_mm else "torch-int4-cpu") and bf16.packed is None
    x = torch.randn(rows, 512)
    fp32 = modules.BitNetLinear(512, 256, linear_class=linear_class, bias=True, dtype=torch.float32)
    fp32.set_codes(bf16.ternary_codes().clone(), torch.float32)
    fp32.weight_scale.copy_(bf16.weight_scale)
    fp32.bias.copy_(bf16.bias)
    with torch.no_grad():
        ref = fp32(x)
        out = bf16(x.bfloat16())
    assert fp32.kernel is None and fp32.packed is not None  # float32: packed, the plain matmul
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_int_mm_sums_bitlinear_exactly_as_transformers_bfloat16_does():
    """bitlinear's activations are integers: torch._int_mm's exact sums, rounded once to bfloat16,
    are what Transformers' BitLinear's bf16 matmul of integers gives (exact in its float32
    accumulator), and the scaling after it is the same operations."""
    from transformers.integrations import bitnet as hf_bitnet

    lin = layer(dtype=torch.bfloat16)
    codes, scale = packing.ternarize(lin.weight)
    ours = modules.BitNetLinear(512, 256, linear_class="bitlinear", bias=True, dtype=torch.bfloat16)
    ours.weight_scale.fill_(float(scale))
    ours.bias.copy_(lin.bias)
    ours.set_codes(codes, torch.bfloat16)
    theirs = hf_bitnet.BitLinear(512, 256, bias=True, dtype=torch.bfloat16)
    theirs.weight.copy_(hf_bitnet.pack_weights(codes.clone()))
    theirs.weight_scale.copy_(ours.weight_scale)
    theirs.bias.copy_(lin.bias)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))  # the same operations on the same exact sums


def test_codes_take_one_byte_on_int_mm_and_half_on_the_int4_kernel():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantizer().quantize_module("l", layer(dtype=torch.bfloat16))
    assert q.kernel == "torch._int_mm" and q.codes8.dtype == torch.int8 and q.codes8.numel() == 256 * 512
    half = modules.BitNetLinear(512, 256, linear_class="bitlinear", bias=False, dtype=torch.bfloat16)
    half.set_codes(q.ternary_codes(), torch.bfloat16, int_mm=False)
    held = sum(t.numel() * t.element_size() for t in half.weights.buffers())
    assert held <= 0.55 * 256 * 512  # int4 codes + a scale and offset per 32-input group
    stored = quantizer().module_tensors("l", q)
    assert stored["weight"].dtype == torch.uint8 and tuple(stored["weight"].shape) == (64, 512)


def test_quantize_warns_once_that_only_bitnet_models_survive():
    q = quantizer()
    with pytest.warns(UserWarning, match="only of models trained for it") as seen:
        q.quantize_module("a", layer())
        q.quantize_module("b", layer())
    assert sum("trained for it" in str(w.message) for w in seen) == 1


def test_offline_layer_passes_input_gradients():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantizer().quantize_module("l", layer(dtype=torch.bfloat16))
    x = torch.randn(3, 512, dtype=torch.bfloat16, requires_grad=True)
    q(x).float().pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_online_mode_trains_the_weights_through_the_ternary_forward():
    lin = layer()
    q = quantizer(linear_class="autobitlinear", quantization_mode="online").quantize_module("l", lin)
    assert torch.equal(q.weight, lin.weight)  # nothing rounded in the stored weights
    x = torch.randn(4, 512)
    out = q(x)
    codes, scale = packing.ternarize(lin.weight)
    xq = (x * (127 / x.abs().amax(-1, keepdim=True))).round() / (127 / x.abs().amax(-1, keepdim=True))
    ref = torch.nn.functional.linear(xq, codes.float() / scale, lin.bias)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    out.pow(2).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_layers_whose_rows_do_not_pack_are_kept_and_reported():
    model = torch.nn.Sequential(torch.nn.Linear(64, 30), torch.nn.Linear(30, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantplug.quantize(
            model, quantplug.config_from_dict({"quant_method": "bitnet"}), progress=False
        )
    assert report.converted == ["1"]
    assert "not a multiple of 4" in report.skipped["0"]


def _checkpoint(tmp_path, **config):
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantplug.quantize(
            model, quantplug.config_from_dict({"quant_method": "bitnet", **config}), progress=False
        )
    return quantplug.save(model, tmp_path / "ckpt"), model


def _rewrite(folder, key, value):
    state = load_file(folder / "model.safetensors")
    state[key] = value
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_two_bit_three_is_refused_by_name(tmp_path):
    folder, _ = _checkpoint(tmp_path)
    key = "model.layers.0.self_attn.q_proj.weight"
    packed = load_file(folder / "model.safetensors")[key]
    _rewrite(folder, key, packed | 3)
    with pytest.raises(quantplug.CheckpointError, match=r"q_proj\.weight'.*value 3"):
        quantplug.load(folder, progress=False)


def test_wrongly_shaped_packed_weight_is_refused(tmp_path):
    folder, _ = _checkpoint(tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite(folder, key, torch.zeros(256, 128, dtype=torch.uint8))  # unpacked rows, packed dtype
    with pytest.raises(quantplug.CheckpointError, match=r"up_proj\.weight'.*uint8 \[64, 128\]"):
        quantplug.load(folder, progress=False)


def test_float_weights_in_an_offline_autobitlinear_checkpoint_must_be_ternary(tmp_path):
    folder, _ = _checkpoint(tmp_path, linear_class="autobitlinear")
    key = "model.layers.1.mlp.down_proj.weight"
    _rewrite(folder, key, torch.randn(128, 256))
    with pytest.raises(quantplug.CheckpointError, match=r"down_proj\.weight'.*not ternary.*online"):
        quantplug.load(folder, progress=False)


def test_float_weights_in_a_bitlinear_checkpoint_are_refused(tmp_path):
    folder, _ = _checkpoint(tmp_path)
    key = "model.layers.1.mlp.down_proj.weight"
    _rewrite(folder, key, torch.zeros(128, 256))
    with pytest.raises(quantplug.CheckpointError, match=r"down_proj\.weight'.*uint8"):
        quantplug.load(folder, progress=False)


def test_online_bitlinear_config_is_refused_in_a_checkpoint(tmp_path):
    folder, _ = _checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quantization_mode"] = "online"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(quantplug.ConfigError, match="quantization_mode"):
        quantplug.load(folder, progress=False)


def test_reload_in_bfloat16_gives_the_float32_logits(tmp_path):
    folder, model = _checkpoint(tmp_path)
    ids = token_ids()
    ref = logits(model, ids)
    bf16 = quantplug.load(folder, dtype=torch.bfloat16, progress=False)
    out = logits(bf16, ids)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 3e-2
