"""quanto-specific behaviour beyond the conformance kit: Transformers' QuantoConfig keys, calibration
(required, refused, persisted), torch.inference_mode, bf16 kernels, odd shapes, and optimum-quanto's
own reader on quantplug's checkpoint layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug_quanto import QuantoConfig

CALIB = [token_ids(seed=5), token_ids(seed=6)]


def quantized(config: QuantoConfig, dtype: torch.dtype = torch.float32):
    model = tiny_llama().to(dtype)
    data = CALIB if config.activations else None
    report = quantplug.quantize(model, config, progress=False, calibration_data=data)
    return model, report


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": "int4"},
        {"weights": "int2", "modules_to_not_convert": ["lm_head", "mlp"]},
        {"weights": "float8", "activations": "float8"},
        {"weights": "int8", "activations": "int8"},
    ],
)
def test_transformers_quanto_config_round_trips(kwargs):
    from transformers import QuantoConfig as HfQuantoConfig

    hf = json.loads(HfQuantoConfig(**kwargs).to_json_string())
    ours = quantplug.config_from_dict(hf)
    assert isinstance(ours, QuantoConfig)
    assert ours.weights == kwargs["weights"] and ours.activations == kwargs.get("activations")
    back = HfQuantoConfig.from_dict(ours.to_dict())
    assert (back.weights, back.activations) == (ours.weights, ours.activations)
    assert back.modules_to_not_convert == kwargs.get("modules_to_not_convert")


def test_activations_none_is_spelled_either_way():
    assert QuantoConfig(activations="none") == QuantoConfig(activations=None) == QuantoConfig()
    assert QuantoConfig(activations="none").to_dict()["activations"] is None


def test_for_bits():
    assert [QuantoConfig.for_bits(b).weights for b in (8, 4, 2)] == ["int8", "int4", "int2"]
    assert QuantoConfig.for_bits(4).activations is None
    with pytest.raises(quantplug.ConfigError, match="8, 4 or 2") as err:
        QuantoConfig.for_bits(3)
    assert err.value.field == "bits"
    for bad in ([], 8.0, True, "8"):  # found by tests/faults' fuzz: [] raised TypeError, 8.0 passed
        with pytest.raises(quantplug.ConfigError, match="8, 4 or 2"):
            QuantoConfig.for_bits(bad)


# -- calibration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("activations", ["int8", "float8"])
def test_activation_quantization_without_data_is_a_config_error(activations):
    model = tiny_llama()
    with pytest.raises(quantplug.ConfigError, match="calibration_data=") as err:
        quantplug.quantize(model, QuantoConfig(activations=activations), progress=False)
    assert err.value.field == "calibration_data"
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear  # untouched


def test_weight_only_with_data_is_refused():
    with pytest.raises(quantplug.ConfigError, match="takes no calibration data"):
        quantplug.quantize(tiny_llama(), QuantoConfig(weights="int4"), progress=False, calibration_data=CALIB)


def test_uncalibrated_layer_refuses_to_run_or_save():
    quantizer = quantplug.AutoQuantizer.from_config(QuantoConfig(activations="int8"))
    assert quantizer.needs_calibration()
    layer = quantizer.quantize_module("x", nn.Linear(64, 32))
    with pytest.raises(quantplug.ConfigError, match="never calibrated"):
        layer(torch.randn(2, 64))
    with pytest.raises(quantplug.ConfigError, match="never calibrated"):
        quantizer.module_tensors("x", layer)


def test_quantize_on_load_cannot_calibrate_and_says_so_up_front(tmp_path):
    ckpt = quantplug.save(tiny_llama(), tmp_path / "fp")
    with pytest.raises(quantplug.ConfigError, match="quantize-on-load cannot") as err:
        quantplug.load(ckpt, config=QuantoConfig(activations="int8"), progress=False)
    assert err.value.field == "calibration_data"
    # weight-only configs need no data and still quantize on load
    model = quantplug.load(ckpt, config=QuantoConfig(weights="int8"), progress=False)
    assert torch.isfinite(logits(model, token_ids())).all()


def test_calibration_fits_scales_and_the_checkpoint_keeps_them(tmp_path):
    model, report = quantized(QuantoConfig(weights="int8", activations="int8"))
    layers = [model.get_submodule(n) for n in report.converted]
    scales = torch.stack([m.input_scale.float() for m in layers])
    assert (scales != 1).all() and (scales > 0).all()
    # optimum-quanto's streamlining drops output quantization where no quantized op consumes it
    flags = {n: m.output_quantized for n, m in zip(report.converted, layers)}
    ids = token_ids()
    out = logits(model, ids)
    loaded = quantplug.load(quantplug.save(model, tmp_path / "ckpt"), progress=False)
    for n in report.converted:
        mine, theirs = model.get_submodule(n), loaded.get_submodule(n)
        assert torch.equal(mine.input_scale, theirs.input_scale)
        assert torch.equal(mine.output_scale, theirs.output_scale)
        assert theirs.output_quantized == flags[n]
    assert torch.equal(logits(loaded, ids), out)


# -- inference mode, dtypes, shapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "config, dtype",
    [
        (QuantoConfig(weights="int4"), torch.float32),  # failed in optimum-quanto alone
        (QuantoConfig(weights="int2"), torch.bfloat16),  # ditto
        (QuantoConfig(weights="int4"), torch.bfloat16),  # tinygemm kernel
        (QuantoConfig(weights="int8", activations="int8"), torch.float32),
    ],
    ids=["int4-fp32", "int2-bf16", "int4-bf16", "w8a8-fp32"],
)
def test_inference_mode_gives_the_no_grad_result(config, dtype):
    model, _ = quantized(config, dtype)
    ids = token_ids()
    ref = logits(model, ids)
    with torch.inference_mode():
        out = model(ids).logits
        gen = model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False)
    assert torch.equal(out, ref)
    assert gen.shape == (1, 6)


@pytest.mark.parametrize("weights", ["int8", "int4", "int2", "float8"])
@pytest.mark.parametrize("shape", [(100, 61), (200, 33), (576, 96)])
def test_odd_shapes_round_trip_through_module_tensors(weights, shape):
    quantizer = quantplug.AutoQuantizer.from_config(QuantoConfig(weights=weights))
    torch.manual_seed(0)
    linear = nn.Linear(*shape)
    x = torch.randn(3, shape[0])
    with torch.no_grad():
        ref = linear(x)
        q = quantizer.quantize_module("l", linear)
        out = q(x)
        tensors = quantizer.module_tensors("l", q)
        meta = nn.Linear(*shape, device="meta")
        expected = quantizer.expected_tensors("l", meta)
        assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == expected
        rebuilt = quantizer.load_module("l", meta, {k: t.clone() for k, t in tensors.items()})
        assert torch.equal(rebuilt(x), out)
    assert ((out - ref).norm() / ref.norm()).item() < 0.75


# -- checkpoints ----------------------------------------------------------------------------------


def test_bf16_int4_reloads_in_a_fresh_process_with_identical_logits(tmp_path):
    from safetensors.torch import load_file, save_file

    # Built as a bf16 load builds it (tiny_llama().to(bfloat16) would also round the rotary
    # frequencies to bf16, which a model created in bf16 does not).
    fp = quantplug.save(tiny_llama(), tmp_path / "fp")
    model = quantplug.load(fp, dtype=torch.bfloat16, progress=False)
    quantplug.quantize(model, QuantoConfig(weights="int4"), progress=False)
    ids = token_ids()
    out = logits(model, ids)
    ckpt = quantplug.save(model, tmp_path / "ckpt")
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    script = textwrap.dedent(
        f"""
        import torch, quantplug
        from safetensors.torch import load_file, save_file
        ids = load_file({str(tmp_path / "ids.safetensors")!r})["ids"]
        model = quantplug.load({str(ckpt)!r}, progress=False)
        layer = model.model.layers[0].mlp.down_proj
        assert type(layer).__name__ == "QuantoLinear", type(layer)
        print(type(layer.weight.data).__name__)
        with torch.inference_mode():
            save_file({{"logits": model(ids).logits.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        proc.stdout.strip().splitlines()[-1] == type(model.model.layers[0].mlp.down_proj.weight.data).__name__
    )
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], out)


def test_optimum_quanto_reads_the_checkpoint_layout(tmp_path):
    """The stored tensors are optimum-quanto's own flattened state dict: its ``requantize`` rebuilds
    the same model from them (plus its quantization map)."""
    from optimum.quanto import quantization_map, requantize
    from safetensors.torch import load_file

    model, report = quantized(QuantoConfig(weights="int4"))
    ids = token_ids()
    ckpt = quantplug.save(model, tmp_path / "ckpt")
    state = load_file(ckpt / "model.safetensors")
    fresh = tiny_llama(seed=123)
    requantize(fresh, state, quantization_map(model), device=torch.device("cpu"))
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_quantizing_twice_is_refused_and_modules_to_not_convert_is_honoured():
    model = tiny_llama()
    report = quantplug.quantize(
        model, QuantoConfig(weights="int8", modules_to_not_convert=["mlp"]), progress=False
    )
    assert not [n for n in report.converted if ".mlp." in n]
    assert report.skipped["model.layers.0.mlp.up_proj"] == "listed in modules_to_not_convert"
    with pytest.raises(quantplug.ConfigError, match="already quantized"):
        quantplug.quantize(model, QuantoConfig(weights="int8"), progress=False)
