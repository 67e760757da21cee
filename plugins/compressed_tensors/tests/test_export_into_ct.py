"""``quantplug.export(..., format="compressed-tensors")``: another backend's checkpoint re-encoded
without going back to full precision -- the exported model computes exactly what the source did,
compressed-tensors' own decompression agrees, and what the format cannot hold is refused unless a
lossy re-quantization is asked for."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_interop import library_logits

import quantplug
from quantplug.cli import main
from quantplug.testing import logits, tiny_llama, token_ids

pytest.importorskip("quantplug_rtn")


def _saved(tmp_path, config, name="src", calibration=None):
    model = tiny_llama()
    quantplug.quantize(model, config, calibration_data=calibration, progress=False)
    return quantplug.save(model, tmp_path / name)


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        (
            {"quant_method": "rtn", "bits": 4, "group_size": 32},
            {"num_bits": 4, "group_size": 32, "strategy": "group"},
        ),
        (
            {"quant_method": "rtn", "bits": 8, "group_size": -1},
            {"num_bits": 8, "group_size": None, "strategy": "channel"},
        ),
        (
            {"quant_method": "rtn", "bits": 2, "group_size": 64},
            {"num_bits": 2, "group_size": 64, "strategy": "group"},
        ),
    ],
    ids=["int4-g32", "int8-channel", "int2-g64"],
)
def test_rtn_exports_exactly(config, expect, tmp_path):
    src = _saved(tmp_path, config)
    ids = token_ids()
    source = logits(quantplug.load(src, progress=False), ids)
    out = quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    assert {k: group["weights"][k] for k in expect} == expect and group["weights"]["symmetric"] is True
    exported = quantplug.load(out, progress=False)
    assert type(exported.model.layers[0].mlp.up_proj).__name__ == "CompressedTensorsLinear"
    assert torch.equal(logits(exported, ids), source)
    assert ((library_logits(out, ids) - source).norm() / source.norm()).item() < 1e-6


def test_gptq_exports_exactly(tmp_path):
    pytest.importorskip("quantplug_gptqmodel")
    ids = token_ids()
    for i, config in enumerate(
        [
            {"quant_method": "gptq", "bits": 4, "group_size": 32},
            {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False},
            {"quant_method": "gptq", "bits": 8, "group_size": -1},
        ]
    ):
        src = _saved(tmp_path, config, f"src{i}", calibration=[token_ids(seed=4)])
        source = logits(quantplug.load(src, progress=False), ids)
        out = quantplug.export(src, tmp_path / f"ct{i}", format="compressed-tensors", progress=False)
        (group,) = json.loads((out / "config.json").read_text())["quantization_config"][
            "config_groups"
        ].values()
        assert group["weights"]["symmetric"] is config.get("sym", True)
        exported = logits(quantplug.load(out, progress=False), ids)
        # the same grid; GPTQModel's kernel dequantizes with its float16 scales in float16, compressed-
        # tensors stores the scales in the model's dtype (float32 here, exactly the same values) and
        # dequantizes in it: the weights differ by float16 rounding
        assert ((exported - source).norm() / source.norm()).item() < 1e-3, config
        assert ((library_logits(out, ids) - exported).norm() / exported.norm()).item() < 1e-6


def test_gptq_act_order_is_refused_with_the_reason(tmp_path):
    pytest.importorskip("quantplug_gptqmodel")
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}
    src = _saved(tmp_path, config, calibration=[token_ids(seed=4)])
    with pytest.raises(quantplug.ConfigError, match="act-order"):
        quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)


def test_float_zero_points_are_refused_unless_requantize_is_asked(tmp_path):
    src = _saved(tmp_path, {"quant_method": "rtn", "bits": 4, "group_size": 32, "symmetric": False})
    with pytest.raises(quantplug.ConfigError, match=r"14 of 14.*zero points are floats.*requantize"):
        quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)
    assert not (tmp_path / "ct").exists()
    out = quantplug.export(
        src, tmp_path / "ct", format="compressed-tensors", requantize="W4A16_ASYM", progress=False
    )
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["weights"]["group_size"] == 128 and group["weights"]["symmetric"] is False
    ids = token_ids()
    source, dense = logits(quantplug.load(src, progress=False), ids), logits(tiny_llama(), ids)
    exported = logits(quantplug.load(out, progress=False), ids)
    # a second rounding: not the source, but as close to it as 4-bit g128 gets to the dense model
    assert not torch.equal(exported, source)
    assert ((exported - source).norm() / source.norm()).item() < 0.3
    assert ((exported - dense).norm() / dense.norm()).item() < 0.3


def test_nf4_is_refused_naming_the_backend(tmp_path):
    pytest.importorskip("quantplug_bnb")
    src = _saved(
        tmp_path, {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    )
    with pytest.raises(quantplug.ConfigError, match=r"bitsandbytes.*integer grids.*requantize"):
        quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)


def test_cli_export_and_its_errors(tmp_path):
    src = _saved(tmp_path, {"quant_method": "rtn", "bits": 4, "group_size": 32})
    runner = CliRunner()
    ok = runner.invoke(
        main, ["export", str(src), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]
    )
    assert ok.exit_code == 0, ok.output
    assert "exported" in ok.output and (tmp_path / "ct" / "config.json").exists()
    again = runner.invoke(
        main, ["export", str(tmp_path / "ct"), "--format", "compressed-tensors", "-o", str(tmp_path / "x")]
    )
    assert again.exit_code != 0 and "already in compressed-tensors format" in again.output
    fp = quantplug.save(tiny_llama(), tmp_path / "fp")
    plain = runner.invoke(
        main, ["export", str(fp), "--format", "compressed-tensors", "-o", str(tmp_path / "y")]
    )
    assert (
        plain.exit_code != 0
        and "not a quantized checkpoint" in plain.output
        and "quantplug quantize" in plain.output
    )
    not_a_format = runner.invoke(main, ["export", str(src), "--format", "rtn", "-o", str(tmp_path / "z")])
    assert not_a_format.exit_code != 0 and "cannot be an export target" in not_a_format.output
    assert "compressed-tensors" in not_a_format.output


def test_torchao_int8_weight_only_exports_and_dynamic_is_refused(tmp_path):
    pytest.importorskip("quantplug_torchao")
    from quantplug_torchao import TorchaoConfig

    ids = token_ids()
    src = _saved(tmp_path, TorchaoConfig.from_mode("int8_weight_only"))
    source = logits(quantplug.load(src, progress=False), ids)
    out = quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    exported = logits(quantplug.load(out, progress=False), ids)
    # the same grid; torchao's int8 matmul and a dense one round in another order
    assert ((exported - source).norm() / source.norm()).item() < 1e-5
    dynamic = _saved(tmp_path, TorchaoConfig.from_mode("int8_dynamic_activation_int8_weight"), "dyn")
    with pytest.raises(quantplug.ConfigError, match="inputs are quantized too"):
        quantplug.export(dynamic, tmp_path / "ct2", format="compressed-tensors", progress=False)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_an_moe_model_exports_expert_by_expert_with_identical_logits(arch, tmp_path):
    """rtn's int8 experts (unfused per expert) re-encoded as compressed-tensors, each expert under
    the checkpoint's per-expert name (Mixtral's ``block_sparse_moe.experts.{e}.w1``)."""
    from safetensors import safe_open

    from quantplug.testing_models import tiny_moe

    model = tiny_moe(arch)
    quantplug.quantize(model, {"quant_method": "rtn", "bits": 8}, progress=False)
    ids = token_ids()
    source = quantplug.save(model, tmp_path / "rtn")
    out = quantplug.export(source, tmp_path / "ct", format="compressed-tensors", progress=False)
    exported = quantplug.load(out, progress=False)
    assert torch.equal(logits(exported, ids), logits(model, ids))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118 (not a dict)
    first = (
        "model.layers.0.block_sparse_moe.experts.7.w2"
        if arch == "mixtral"
        else "model.layers.0.mlp.experts.7.down_proj"
    )
    assert {f"{first}.weight_packed", f"{first}.weight_scale"} <= keys
