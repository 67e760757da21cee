"""``quantplug.check_lora_targets``: a LoRA config aimed at layers a backend replaced with layers
adapters do not train on is a ConfigError naming them, before PEFT is involved."""

from __future__ import annotations

import pytest

import quantplug
from quantplug.testing import tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture
def rtn_model():
    model = tiny_llama()
    quantplug.quantize(model, {"quant_method": "rtn", "bits": 4}, progress=False)
    return model


def test_targets_on_a_non_trainable_backend_are_named(rtn_model):
    config = peft.LoraConfig(r=8, target_modules=["v_proj", "q_proj"])
    with pytest.raises(quantplug.ConfigError) as err:
        quantplug.check_lora_targets(rtn_model, config)
    text = str(err.value)
    assert "target_modules=['q_proj', 'v_proj'] match 4 layers quantized by 'rtn'" in text
    assert (
        "'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj'" in text and "RtnLinear" in text
    )
    assert "backend 'rtn' is not trainable" in text and "quantplug select --finetune" in text
    assert err.value.field == "target_modules"
    # what PEFT itself says for the same config: the class only, no module name, no way out
    with pytest.raises(ValueError, match="Target module RtnLinear") as peft_err:
        peft.get_peft_model(rtn_model, config)
    assert "model.layers" not in str(peft_err.value)


@pytest.mark.parametrize(
    ("targets", "count"), [("all-linear", 14), (r".*layers\.1\.mlp\.down_proj", 1), (["o_proj"], 2)]
)
def test_every_way_of_naming_targets_is_matched_as_peft_matches_it(rtn_model, targets, count):
    with pytest.raises(quantplug.ConfigError, match=f"match {count} layers? quantized by 'rtn'"):
        quantplug.check_lora_targets(rtn_model, peft.LoraConfig(r=8, target_modules=targets))


def test_targets_left_in_full_precision_pass_and_train(rtn_model):
    import torch

    config = peft.LoraConfig(r=8, target_modules=["lm_head"])
    assert quantplug.check_lora_targets(rtn_model, config) == []
    model = peft.get_peft_model(rtn_model, config)
    loss = model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss
    loss.backward()
    assert model.base_model.model.lm_head.lora_B["default"].weight.grad is not None


def test_a_model_quantplug_did_not_quantize_has_no_quantized_targets():
    assert quantplug.check_lora_targets(tiny_llama(), peft.LoraConfig(r=8, target_modules=["q_proj"])) == []
