"""fp8 / mxfp8 / fbgemm_fp8 against Transformers 5: checkpoints quantplug writes load in Transformers
(its CPU path dequantizes them), checkpoints in Transformers' layout (tensors made by Transformers'
own ``Fp8Quantize``, the op its ``save_pretrained`` writes FP8 with) load in quantplug, each with
the logits of Transformers' CPU dequantizer; the loaded model keeps 1 byte per weight."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Quantize

import quantplug
from quantplug.testing_models import tiny_llama, tiny_moe

IDS = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hf_logits(folder, dtype=torch.float32) -> torch.Tensor:
    """Transformers' own load of ``folder`` (on CPU: its FP8 dequantizer, bf16 or fp32 Linears)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    assert not [m for m in model.modules() if "FP8" in type(m).__name__]  # dequantized, as on any CPU
    return logits(model)


@pytest.mark.parametrize(
    "config",
    [
        {"quant_method": "fp8"},
        {"quant_method": "fp8", "weight_block_size": None},
        {"quant_method": "fp8", "scale_fmt": "ue8m0"},
        {"quant_method": "mxfp8"},
    ],
    ids=["block128", "per-tensor", "ue8m0", "mxfp8"],
)
def test_transformers_reads_what_quantplug_writes(config, tmp_path):
    model = tiny_llama()
    quantplug.quantize(model, config, progress=False)
    ours = logits(model)
    folder = quantplug.save(model, tmp_path / "q")
    stored = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == config["quant_method"]
    assert FineGrainedFP8Config(**stored).weight_block_size == stored["weight_block_size"]
    assert rel(hf_logits(folder), ours) < 1e-6  # float32: the same products
    bf16 = quantplug.load(folder, dtype=torch.bfloat16, progress=False)
    assert torch.equal(logits(bf16), hf_logits(folder, torch.bfloat16))  # bf16 fast path: bit-identical


def write_transformers_fp8(model, folder, fp8_config: FineGrainedFP8Config, scale_dtype=torch.float32):
    """``model`` saved as Transformers writes FP8: every Linear weight but the head and the routers
    through Transformers' ``Fp8Quantize`` (per expert for MoE models, as Qwen3-MoE-FP8 ships)."""
    model.save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    op = Fp8Quantize(types.SimpleNamespace(quantization_config=fp8_config))
    out = {}
    for key, t in tensors.items():
        skip = "lm_head" in key or "embed" in key or key.endswith(("mlp.gate.weight", "router.weight"))
        if t.dim() == 2 and key.endswith(".weight") and not skip:
            for k, v in op.convert({key: t}).items():
                out[k] = v.to(scale_dtype) if k.endswith("_scale_inv") and v.dtype == torch.float32 else v
        else:
            out[key] = t
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"] = fp8_config.to_dict()
    (folder / "config.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize(
    "arch, block, scale_fmt, scale_dtype",
    [
        ("llama", (128, 128), "float", torch.float32),  # DeepSeek-V3
        ("llama", (128, 128), "float", torch.bfloat16),  # recent Qwen FP8 releases
        ("llama", (128, 128), "ue8m0", torch.float32),
        ("qwen3_moe", (128, 128), "float", torch.float32),  # Qwen3-MoE-FP8: experts stored one by one
        ("mixtral", (128, 128), "float", torch.float32),
    ],
)
def test_quantplug_reads_transformers_fp8_layout(arch, block, scale_fmt, scale_dtype, tmp_path):
    model = tiny_llama() if arch == "llama" else tiny_moe(arch)
    cfg = FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt)
    stored = write_transformers_fp8(model, tmp_path / "hf", cfg, scale_dtype)
    assert any(k.endswith("weight_scale_inv") for k in stored)
    ref = hf_logits(tmp_path / "hf")
    loaded = quantplug.load(tmp_path / "hf", progress=False)
    assert rel(logits(loaded), ref) < 1e-5
    if arch != "llama":  # experts merged into the stacked module, kept in fp8
        experts = loaded.model.layers[0].mlp.experts
        assert type(experts).__name__ == "Fp8Experts" and experts.down_proj.dtype == torch.float8_e4m3fn
    # saved back: the same tensors under the same names
    again = quantplug.save(loaded, tmp_path / "again")
    written = load_file(str(again / "model.safetensors"))
    assert written.keys() == stored.keys()
    for k, t in stored.items():
        same = written[k].view(torch.uint8) if t.element_size() == 1 else written[k]
        assert torch.equal(same, t.view(torch.uint8) if t.element_size() == 1 else t), k


def test_a_loaded_fp8_model_keeps_one_byte_per_weight(tmp_path):
    model = tiny_moe("qwen3_moe")
    quantplug.quantize(model, {"quant_method": "fp8"}, progress=False)
    folder = quantplug.save(model, tmp_path / "q")
    loaded = quantplug.load(folder, progress=False, dtype=torch.bfloat16)
    quantized = [m for m in loaded.modules() if type(m).__name__ in ("Fp8Linear", "Fp8Experts")]
    weights = sum(t.numel() for m in quantized for t in m.buffers() if t.dtype == torch.float8_e4m3fn)
    held = sum(t.numel() * t.element_size() for m in quantized for t in m.buffers())
    held += sum(p.numel() * p.element_size() for m in quantized for p in m.parameters())
    assert weights > 0.8 * sum(p.numel() for p in tiny_moe("qwen3_moe").parameters())
    assert held / weights <= 1.1, f"{held / weights:.3f} bytes per quantized weight"


def test_static_activation_scales_are_kept_and_quantizing_static_is_refused(tmp_path):
    model = tiny_llama()
    cfg = FineGrainedFP8Config(activation_scheme="static")
    stored = write_transformers_fp8(model, tmp_path / "hf", cfg)
    for key in [k for k in stored if k.endswith("weight_scale_inv")]:
        stored[key.replace("weight_scale_inv", "activation_scale")] = torch.tensor(0.01 + len(key) / 1000)
    save_file(stored, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    loaded = quantplug.load(tmp_path / "hf", progress=False)
    assert rel(logits(loaded), hf_logits(tmp_path / "hf")) < 1e-5  # weight-only, as Transformers on CPU
    written = load_file(str(quantplug.save(loaded, tmp_path / "again") / "model.safetensors"))
    scales = [k for k in stored if k.endswith("activation_scale")]
    assert scales and all(torch.equal(written[k].reshape(()), stored[k]) for k in scales)
    with pytest.raises(quantplug.ConfigError, match="calibrated"):
        quantplug.quantize(
            tiny_llama(), {"quant_method": "fp8", "activation_scheme": "static"}, progress=False
        )


def test_fbgemm_fp8_checkpoint_from_the_formula_loads(tmp_path):
    """Transformers refuses fbgemm_fp8 without a GPU; the reference is the format's formula
    (row max / 448, e4m3), dequantized by hand into the full-precision model."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "fb")
    tensors = load_file(str(tmp_path / "fb" / "model.safetensors"))
    ref_model = tiny_llama()
    dequantized = {}
    for key, t in list(tensors.items()):
        if t.dim() == 2 and "layers" in key and key.endswith(".weight"):
            scale = (t.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-12)
            q = (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[key], tensors[key.replace(".weight", ".weight_scale")] = q, scale.float()
            dequantized[key] = q.float() * scale
    save_file(tensors, str(tmp_path / "fb" / "model.safetensors"), metadata={"format": "pt"})
    data = json.loads((tmp_path / "fb" / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    (tmp_path / "fb" / "config.json").write_text(json.dumps(data))
    ref_model.load_state_dict(dequantized, strict=False)
    loaded = quantplug.load(tmp_path / "fb", progress=False)
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "Fp8Linear"
    assert rel(logits(loaded), logits(ref_model)) < 1e-5


def test_quantize_on_load_equals_quantize_then_load(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    on_load = quantplug.load(tmp_path / "fp", config={"quant_method": "fp8"}, progress=False)
    model = tiny_llama()
    quantplug.quantize(model, {"quant_method": "fp8"}, progress=False)
    assert torch.equal(logits(on_load), logits(model))


def test_ignored_layers_is_minimax_name_for_modules_to_not_convert():
    model = tiny_llama()
    report = quantplug.quantize(
        model, {"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp"]}, progress=False
    )
    assert "model.layers.0.mlp.up_proj" in report.skipped
    assert type(model.model.layers[1].mlp.up_proj).__name__ == "Fp8Linear"


def test_a_scale_grid_that_does_not_fit_is_named(tmp_path):
    write_transformers_fp8(tiny_llama(), tmp_path / "hf", FineGrainedFP8Config())
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.1.mlp.down_proj.weight_scale_inv"
    tensors[key] = torch.ones(3, 3)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(quantplug.CheckpointError, match=key.replace(".", r"\.")):
        quantplug.load(tmp_path / "hf", progress=False)
    tensors[key] = torch.ones(1, 2, dtype=torch.int32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(quantplug.CheckpointError, match="dtype torch.int32"):
        quantplug.load(tmp_path / "hf", progress=False)


def test_an_unsupported_field_is_a_config_error_naming_it(tmp_path):
    write_transformers_fp8(tiny_llama(), tmp_path / "hf", FineGrainedFP8Config())
    data = json.loads((tmp_path / "hf" / "config.json").read_text())
    data["quantization_config"]["expert_dtype"] = "fp4"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(data))
    with pytest.raises(quantplug.ConfigError, match="expert_dtype"):
        quantplug.load(tmp_path / "hf", progress=False)


def test_a_torch_without_float8_is_told_the_version_needed(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(quantplug.ConfigError, match=r"torch>=2\.1"):
        quantplug.quantize(tiny_llama(), {"quant_method": "fp8"}, progress=False)


def tiny_llama4():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(
        hidden_size=128,
        intermediate_size=128,
        intermediate_size_mlp=256,
        num_local_experts=4,
        num_experts_per_tok=1,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=384,
        max_position_embeddings=64,
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 1],
        attention_chunk_size=64,
    )
    model = transformers.Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.02)
    return model


def test_fbgemm_llama4_stacked_experts_with_row_scales_load(tmp_path):
    """Meta's Llama-4 FP8 layout: stacked experts ``gate_up_proj`` [E, H, 2I] e4m3 with
    ``gate_up_proj_scale`` [E, 1, 2I] and ``down_proj`` [E, I, H] with ``down_proj_scale`` [E, H, 1]
    (Transformers' FbgemmFp8Llama4TextExperts); each expert is loaded with its rows' scales."""
    model = tiny_llama4()
    model.save_pretrained(tmp_path / "l4")
    tensors = load_file(str(tmp_path / "l4" / "model.safetensors"))
    reference = {}
    for key, t in list(tensors.items()):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]: scale per out
            scale = (t.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-12)  # [E, 1, out]
            q = (t / scale).to(torch.float8_e4m3fn)
            tensors[key] = q
            tensors[key + "_scale"] = (
                scale if key.endswith("gate_up_proj") else scale.transpose(1, 2).contiguous()
            )
            reference[key] = q.float() * scale
        elif t.dim() == 2 and "layers" in key and "router" not in key:
            scale = (t.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-12)
            tensors[key] = q = (t / scale).to(torch.float8_e4m3fn)
            tensors[key.replace(".weight", ".weight_scale")] = scale
            reference[key] = q.float() * scale
    save_file(tensors, str(tmp_path / "l4" / "model.safetensors"), metadata={"format": "pt"})
    data = json.loads((tmp_path / "l4" / "config.json").read_text())
    data["quantization_config"] = {
        "quant_method": "fbgemm_fp8",
        "modules_to_not_convert": ["router", "lm_head"],
    }
    (tmp_path / "l4" / "config.json").write_text(json.dumps(data))
    ref = tiny_llama4()
    ref.load_state_dict(reference, strict=False)
    loaded = quantplug.load(tmp_path / "l4", progress=False)
    experts = loaded.model.layers[0].feed_forward.experts
    assert type(experts.get_submodule("3.down_proj")).__name__ == "Fp8Linear"
    assert rel(logits(loaded), logits(ref)) < 1e-5


def test_stacked_fp8_experts_offload_to_disk_as_they_load_resident(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_moe("qwen3_moe")
    quantplug.quantize(model, {"quant_method": "fp8"}, progress=False)
    folder = quantplug.save(model, tmp_path / "q")
    resident = logits(quantplug.load(folder, progress=False))
    offloaded = quantplug.load(
        folder,
        device_map={"": "cpu", "model.layers.1": "disk"},
        offload_folder=tmp_path / "off",
        progress=False,
    )
    assert torch.equal(logits(offloaded), resident)
