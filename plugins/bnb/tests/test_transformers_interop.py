"""Checkpoints and configs move both ways between quantplug and Transformers' own bitsandbytes path."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug_bnb import BnbConfig

CASES = {
    "int8": {"load_in_8bit": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-double-quant": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    },
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
}


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    return path


def _bnb_modules(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_transformers_checkpoint_loads_with_quantplug(case, fp_checkpoint, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=BitsAndBytesConfig(**CASES[case]), device_map="cpu"
    )
    hf.save_pretrained(tmp_path / "hf")
    ids = token_ids()
    expected = logits(hf, ids)

    model = quantplug.load(tmp_path / "hf", progress=False)
    assert _bnb_modules(model) == _bnb_modules(hf)
    assert model.quantplug_info.config == BnbConfig(**CASES[case])
    assert torch.equal(logits(model, ids), expected)

    # and saving it again with quantplug writes the same tensors Transformers wrote
    quantplug.save(model, tmp_path / "qp")
    ours, theirs = _tensors(tmp_path / "qp"), _tensors(tmp_path / "hf")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_quantplug_checkpoint_loads_with_transformers(case, tmp_path):
    model = tiny_llama()
    quantplug.quantize(model, BnbConfig(**CASES[case]), progress=False)
    ids = token_ids()
    expected = logits(model, ids)  # a forward first: saving must not depend on it
    quantplug.save(model, tmp_path / "qp")

    qc = json.loads((tmp_path / "qp" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "qp", device_map="cpu")
    assert isinstance(hf.config.quantization_config, BitsAndBytesConfig)
    assert _bnb_modules(hf) == set(model.quantplug_info.modules)
    assert torch.equal(logits(hf, ids), expected)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_configs_interoperate(case):
    ours = BnbConfig(**CASES[case])
    theirs = BitsAndBytesConfig.from_dict(ours.to_dict())
    for key, value in ours.to_dict().items():
        if key not in ("quant_method", "modules_to_not_convert"):
            got = getattr(theirs, key)
            assert (str(got).removeprefix("torch.") if isinstance(got, torch.dtype) else got) == value, key
    # Transformers' own dict (with its private _load_in_* copies) reads back into the same config
    assert BnbConfig.from_dict(BitsAndBytesConfig(**CASES[case]).to_dict()) == ours
    assert quantplug.config_from_dict(json.loads(json.dumps(theirs.to_dict()))) == ours


def test_skip_list_matches_transformers(fp_checkpoint, tmp_path):
    # a component run, a suffix, and a regex: quantplug skips exactly what Transformers skips
    skip = ["lm_head", "model.layers.1", "down_proj", r"model\.layers\.0\.self_attn\.[qk]_proj"]
    cfg = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "llm_int8_skip_modules": skip}
    hf = AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=BitsAndBytesConfig(**cfg), device_map="cpu"
    )
    model = tiny_llama()
    report = quantplug.quantize(model, BnbConfig(**cfg), progress=False)
    assert (
        set(report.converted)
        == _bnb_modules(hf)
        == {
            "model.layers.0.self_attn.v_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.mlp.up_proj",
        }
    )
    assert BnbConfig(**cfg).modules_to_not_convert == tuple(skip)
    hf.save_pretrained(tmp_path / "hf")
    assert torch.equal(
        logits(quantplug.load(tmp_path / "hf", progress=False), token_ids()), logits(hf, token_ids())
    )
