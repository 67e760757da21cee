"""``quantplug.export(..., format="compressed-tensors")`` of float8 checkpoints quantplug-float writes:
fp8 block 128 -> FP8_BLOCK, fbgemm_fp8 -> FP8_DYNAMIC (channel), fp8 per tensor -> FP8 tensor weights
with dynamic per-token inputs. The e4m3 codes and the scales are copied as they are: the exported
model computes the source's weights exactly; compressed-tensors (its own ModelCompressor), Transformers
and quantplug agree on what the exported folder computes; what has no scheme (MXFP8) is refused by
name."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from test_interop import library_logits

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids

pytest.importorskip("quantplug_float")

CASES = {
    "fp8-block128": ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "FP8_BLOCK"),
    "fbgemm-channel": ({"quant_method": "fbgemm_fp8"}, "FP8_DYNAMIC"),
    "fp8-tensor": ({"quant_method": "fp8", "weight_block_size": None}, None),
}


def _saved(tmp_path, config, name="src"):
    model = tiny_llama()
    quantplug.quantize(model, config, progress=False)
    return quantplug.save(model, tmp_path / name)


def _scheme(group: dict) -> dict:
    return {k: group[k] for k in ("weights", "input_activations")}


def _library_scheme(preset: str) -> dict:
    dump = preset_name_to_scheme(preset, ["Linear"]).model_dump()
    return {k: {a: v for a, v in dump[k].items() if v is not None} for k in ("weights", "input_activations")}


def _without_nones(scheme: dict) -> dict:
    return {k: {a: v for a, v in scheme[k].items() if v is not None} for k in scheme}


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_exports_its_codes_and_scales_as_they_are(case, tmp_path):
    config, preset = CASES[case]
    src = _saved(tmp_path, config)
    ids = token_ids()
    source_model = quantplug.load(src, progress=False)
    source = logits(source_model, ids)
    out = quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    if preset is not None:  # exactly compressed-tensors' preset
        assert _without_nones(_scheme(group)) == _library_scheme(preset)
    else:  # per-tensor fp8 weights, inputs dynamic per token (no preset: FP8's inputs are static)
        assert group["weights"]["strategy"] == "tensor" and group["weights"]["type"] == "float"
        assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]

    exported = quantplug.load(out, progress=False)
    for name, layer in source_model.named_modules():
        if type(layer).__name__ != "Fp8Linear":
            continue
        ct = exported.get_submodule(name)
        assert type(ct).__name__ == "CompressedTensorsLinear", name
        assert torch.equal(ct.weight.view(torch.uint8), layer.weight.view(torch.uint8)), name
        assert torch.equal(ct.weight_scale.reshape(layer.scale.shape), layer.scale.float()), name
        # compressed-tensors' own decompression gives the source's dequantized weight, bit for bit
        assert torch.equal(ct.dense_weight(), layer.dequantize(torch.float32)), name

    # the scheme rounds inputs to fp8 per token (group): without that, the source's logits exactly
    ours = logits(exported, ids)
    for layer in exported.modules():
        if type(layer).__name__ == "CompressedTensorsLinear":
            layer.observing = True  # the plugin's switch that skips input quantization (calibration)
    assert torch.equal(logits(exported, ids), source)
    assert 0 < ((ours - source).norm() / source.norm()).item() < 0.1  # fp8 rounding of the inputs

    # compressed-tensors' ModelCompressor and Transformers read the folder and compute what quantplug does
    assert ((library_logits(out, ids) - ours).norm() / ours.norm()).item() < 1e-6
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert ((logits(hf, ids) - ours).norm() / ours.norm()).item() < 1e-3


def test_fp8_block_scales_of_a_ragged_grid_export(tmp_path):
    """Tiles of 96 x 128 leave a ragged last row of tiles (128 and 256 rows): the ceil grid goes over as
    it is, with its block_structure, and compressed-tensors decompresses it the same; tiles whose
    columns do not divide the inputs (compressed-tensors quantizes inputs per tile width) are refused."""
    src = _saved(tmp_path, {"quant_method": "fp8", "weight_block_size": [96, 128]})
    ids = token_ids()
    source = quantplug.load(src, progress=False)
    out = quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert (
        group["weights"]["block_structure"] == [96, 128] and group["input_activations"]["group_size"] == 128
    )
    exported = quantplug.load(out, progress=False)
    down = exported.model.layers[0].mlp.down_proj
    assert list(down.weight_scale.shape) == [2, 2]  # [ceil(128 / 96), ceil(256 / 128)]
    assert torch.equal(down.dense_weight(), source.model.layers[0].mlp.down_proj.dequantize(torch.float32))
    ours = logits(exported, ids)
    assert ((library_logits(out, ids) - ours).norm() / ours.norm()).item() < 1e-6

    src = _saved(tmp_path, {"quant_method": "fp8", "weight_block_size": [128, 96]}, "src96")
    with pytest.raises(
        quantplug.ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj has 128 inputs.* 96 "
    ):
        quantplug.export(src, tmp_path / "ct96", format="compressed-tensors", progress=False)


def test_quantizing_with_an_fp8_block_group_is_what_compressed_tensors_reads(tmp_path):
    """A user-written FP8_BLOCK config group (the block strategy this plugin now reads) quantizes too:
    a scale per 128 x 128 tile from the tile's min/max, and compressed-tensors' own load agrees."""
    group = preset_name_to_scheme("FP8_BLOCK", ["Linear"]).model_dump()
    model = tiny_llama()
    ids = token_ids()
    quantplug.quantize(
        model, {"quant_method": "compressed-tensors", "config_groups": {"g": group}}, progress=False
    )
    up = model.model.layers[0].mlp.up_proj
    assert list(up.weight_scale.shape) == [2, 1] and up.weight.dtype == torch.float8_e4m3fn
    out = quantplug.save(model, tmp_path / "ct")
    ours = logits(model, ids)
    assert ((library_logits(out, ids) - ours).norm() / ours.norm()).item() < 1e-6


def test_mxfp8_is_refused_naming_the_layer_and_the_format(tmp_path):
    src = _saved(tmp_path, {"quant_method": "mxfp8"})
    with pytest.raises(quantplug.ConfigError) as err:
        quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message and "MXFP8" in message and "e8m0" in message
    assert not (tmp_path / "ct").exists()


def test_bfloat16_model_with_float32_scales_is_refused_not_rounded(tmp_path):
    """compressed-tensors stores scales in the model's dtype: float32 scales that bfloat16 cannot hold
    would be rounded, so export refuses and says how to keep them."""
    model = tiny_llama().to(torch.bfloat16)
    quantplug.quantize(model, {"quant_method": "fbgemm_fp8"}, progress=False)
    for layer in model.modules():
        if type(layer).__name__ == "Fp8Linear":
            layer.weight_scale.mul_(1 + 2**-12)  # fbgemm's row scales: float32 values off bfloat16's grid
    src = quantplug.save(model, tmp_path / "src")
    with pytest.raises(
        quantplug.ConfigError, match=r"float32 scales .* torch\.bfloat16 .* cannot hold exactly"
    ):
        quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)


def test_fp8_moe_with_stacked_experts_is_refused_saying_why(tmp_path):
    from quantplug.testing_models import tiny_moe

    model = tiny_moe(
        "qwen3_moe", num_hidden_layers=1, hidden_size=128, intermediate_size=128, moe_intermediate_size=128
    )
    quantplug.quantize(model, {"quant_method": "fp8"}, progress=False)
    assert model.quantplug_info.experts  # fp8 keeps them stacked (Fp8Experts)
    src = quantplug.save(model, tmp_path / "src")
    with pytest.raises(quantplug.ConfigError, match=r"mlp\.experts holds experts 'fp8' quantized stacked"):
        quantplug.export(src, tmp_path / "ct", format="compressed-tensors", progress=False)
