"""compressed-tensors both ways: checkpoints compressed-tensors' own ModelCompressor writes load
through ``quantplug.load`` with the logits of the library's own decompression, checkpoints quantplug
writes decompress in the library (and in Transformers, where Transformers can) to the logits of the
quantplug model, and what does not fit is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids

SCHEMES = ["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC"]
SYMMETRIC = ["W4A16", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def write_with_library(folder, config_groups: dict, ignore=("lm_head",), seed=0, max_shard_size=None):
    """A tiny Llama compressed by compressed-tensors the way llm-compressor does it: apply the
    config, set the qparams a min/max observer would (weights per their strategy, static inputs
    to a fixed range), ``ModelCompressor.from_pretrained_model(...).compress_model``, save,
    ``update_config``."""
    model = tiny_llama(seed=seed)
    apply_quantization_config(model, QuantizationConfig(config_groups=config_groups, ignore=list(ignore)))
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        args, w = scheme.weights, module.weight.data
        if args.strategy == "group":
            g = w.reshape(w.shape[0], -1, args.group_size)
            lo, hi = g.amin(-1), g.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        else:
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        scale, zero = calculate_qparams(lo, hi, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(0.03)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    compressor.update_config(str(folder))
    return folder


def library_logits(folder, ids) -> torch.Tensor:
    """compressed-tensors' own load of ``folder`` in float32: apply the stored config to a fresh
    model of the folder's config, compress its structure, load the stored tensors,
    ``decompress_model``, run (other weights are random: every quantized tensor must come from the
    files). test_zoo.py uses it too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    apply_quantization_config(model, config)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary" not in k], missing
    compressor.decompress_model(model)
    return logits(model, ids)


def _groups(name: str) -> dict:
    return {"group_0": preset_name_to_scheme(name, ["Linear"])}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_library_checkpoint_loads_with_the_library_logits(scheme, tmp_path):
    folder = write_with_library(tmp_path / scheme, _groups(scheme))
    ids = token_ids()
    model = quantplug.load(folder, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "CompressedTensorsLinear"
    assert isinstance(model.lm_head, torch.nn.Linear)  # ignored
    assert _rel(logits(model, ids), library_logits(folder, ids)) < 1e-6


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantplug_checkpoint_decompresses_in_the_library(scheme, tmp_path):
    ids = token_ids()
    model, dense = tiny_llama(), tiny_llama()
    calibration = [token_ids(seed=4)] if scheme == "FP8" else None
    quantplug.quantize(
        model, {"quant_method": "compressed-tensors", "scheme": scheme}, calibration_data=calibration
    )
    expected = logits(model, ids)
    assert 0 < _rel(expected, logits(dense, ids)) < 0.3
    folder = quantplug.save(model, tmp_path / scheme)
    assert _rel(library_logits(folder, ids), expected) < 1e-6
    assert torch.equal(logits(quantplug.load(folder, progress=False), ids), expected)


def test_mixed_precision_ignore_patterns_and_shards(tmp_path):
    """Two groups (8-bit dynamic W8A8 on attention by regex, W4A16 on every other Linear), a regex
    in ``ignore`` and a checkpoint in several files."""
    groups = {
        "attention": preset_name_to_scheme("W8A8", ["re:.*self_attn.*"]),
        "rest": preset_name_to_scheme("W4A16", ["Linear"]),
    }
    folder = write_with_library(
        tmp_path / "mixed",
        groups,
        ignore=["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj"],
        max_shard_size="100KB",
    )
    assert len(list(folder.glob("*.safetensors"))) > 1
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    ids = token_ids()
    model = quantplug.load(folder, progress=False)
    assert model.model.layers[0].self_attn.q_proj.format == "int-quantized"
    assert model.model.layers[0].mlp.up_proj.format == "pack-quantized"
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert _rel(logits(model, ids), library_logits(folder, ids)) < 1e-6
    # and back: quantplug's re-save is read by the library the same way
    again = quantplug.save(model, tmp_path / "again")
    assert (
        json.loads((again / "config.json").read_text())["quantization_config"]["config_groups"]
        == qc["config_groups"]
    )
    assert _rel(library_logits(again, ids), logits(model, ids)) < 1e-6


_TRANSFORMERS = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from quantplug.testing import logits, token_ids
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    save_file({"logits": logits(model, token_ids()).contiguous()}, sys.argv[2])
    """
)


@pytest.mark.parametrize("scheme", SYMMETRIC)
def test_transformers_loads_what_quantplug_writes(scheme, tmp_path):
    """In a fresh process (no quantplug plugin imported), Transformers' own compressed-tensors
    integration reads the folder to the same logits."""
    pytest.importorskip("transformers")
    model = tiny_llama()
    calibration = [token_ids(seed=4)] if scheme == "FP8" else None
    quantplug.quantize(
        model, {"quant_method": "compressed-tensors", "scheme": scheme}, calibration_data=calibration
    )
    folder = quantplug.save(model, tmp_path / scheme)
    out = tmp_path / "hf.safetensors"
    subprocess.run(
        [sys.executable, "-c", _TRANSFORMERS, str(folder), str(out)], check=True, capture_output=True
    )
    assert _rel(load_file(out)["logits"], logits(model, token_ids())) < 1e-6


def test_asymmetric_pack_quantized_loads_where_transformers_fails(tmp_path):
    """Transformers 5.24 refuses asymmetric pack-quantized checkpoints (weight_zero_point shape);
    quantplug.load reads them. If this starts failing because Transformers loads them, update the
    README's interop note."""
    transformers = pytest.importorskip("transformers")
    folder = write_with_library(tmp_path / "asym", _groups("W4A16_ASYM"))
    with pytest.raises(Exception, match="mismatch|size"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = token_ids()
    assert _rel(logits(quantplug.load(folder, progress=False), ids), library_logits(folder, ids)) < 1e-6


def test_quantize_on_load_equals_quantize_after_load(tmp_path):
    fp = quantplug.save(tiny_llama(seed=2), tmp_path / "fp")
    config = {"quant_method": "compressed-tensors", "scheme": "W4A16_ASYM", "group_size": 32}
    on_load = quantplug.load(fp, config=config, progress=False)
    after = quantplug.load(fp, progress=False)
    quantplug.quantize(after, config, progress=False)
    ids = token_ids()
    assert torch.equal(logits(on_load, ids), logits(after, ids))


def test_static_int8_activations_are_calibrated(tmp_path):
    """W8A8 with static per-tensor input scales (config_groups) needs calibration; the scales come
    from the calibration batches and the library reads them back."""
    groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "channel",
                "dynamic": False,
            },
            "input_activations": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "tensor",
                "dynamic": False,
            },
        }
    }
    config = {"quant_method": "compressed-tensors", "config_groups": groups, "ignore": ["lm_head"]}
    assert quantplug.AutoQuantizer.from_config(config).needs_calibration()
    with pytest.raises(quantplug.ConfigError, match="calibration"):
        quantplug.quantize(tiny_llama(), config)
    model, dense, ids = tiny_llama(), tiny_llama(), token_ids()
    quantplug.quantize(model, config, calibration_data=[token_ids(seed=4), token_ids(seed=5)])
    scales = [m.input_scale.item() for m in model.modules() if hasattr(m, "input_scale")]
    assert len(scales) == 14 and all(s != 1.0 and s > 0 for s in scales)
    assert _rel(logits(model, ids), logits(dense, ids)) < 0.1
    folder = quantplug.save(model, tmp_path / "static")
    assert _rel(library_logits(folder, ids), logits(model, ids)) < 1e-6


# -- bad input ------------------------------------------------------------------------------------


def test_config_disagreeing_with_tensors_names_a_tensor(tmp_path):
    folder = write_with_library(tmp_path / "w8a8", _groups("W8A8"))
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text())
    data["quantization_config"]["config_groups"] = {
        "group_0": json.loads(preset_name_to_scheme("W4A16", ["Linear"]).model_dump_json())
    }
    data["quantization_config"]["format"] = "pack-quantized"
    config_path.write_text(json.dumps(data))
    with pytest.raises(quantplug.CheckpointError, match=r"weight_packed|\.weight'"):
        quantplug.load(folder, progress=False)


def test_weight_shape_disagreeing_with_the_model(tmp_path):
    folder = write_with_library(tmp_path / "w4", _groups("W4A16"))
    path = folder / "model.safetensors"
    state = load_file(path)
    key = "model.layers.0.mlp.up_proj.weight_shape"
    state[key] = torch.tensor([256, 64])
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(quantplug.CheckpointError, match="up_proj.weight_shape"):
        quantplug.load(folder, progress=False)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("sparsity_config", {"format": "sparse-24-bitmask", "global_sparsity": 0.5}),
        ("transform_config", {"config_groups": {"u": {"type": "hadamard"}}}),
        ("kv_cache_scheme", {"num_bits": 8, "type": "float"}),
    ],
)
def test_what_cannot_be_applied_is_refused_not_loaded_densely(key, value, tmp_path):
    folder = write_with_library(tmp_path / "w4", _groups("W4A16"))
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text())
    data["quantization_config"][key] = value
    config_path.write_text(json.dumps(data))
    with pytest.raises(quantplug.ConfigError, match=key):
        quantplug.load(folder, progress=False)


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(quantplug.ConfigError, match="W4A16.*FP8_DYNAMIC"):
        quantplug.quantize(tiny_llama(), {"quant_method": "compressed-tensors", "scheme": "W3A3"})
