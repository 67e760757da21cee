"""QLoRA through PEFT on quantplug's bitsandbytes models (issue 19, part 1): every preset trains
LoRA adapters with PEFT's own bitsandbytes LoRA layers, only the adapters change, and the saved
adapter re-applies to the model loaded fresh with ``quantplug.load``. This test is where the
presets' ``trainable`` flag comes from."""

from __future__ import annotations

import pytest
import torch
from peft import (  # no skip: tox installs it
    LoraConfig,
    PeftModel,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from peft.tuners.lora import bnb as lora_bnb

import quantplug
from quantplug.candidates import presets_of
from quantplug.testing import tiny_llama, token_ids

PRESETS = [p.name for p in presets_of(quantplug.get_backend("bitsandbytes"))]
LORA_LAYERS = {True: lora_bnb.Linear4bit, False: lora_bnb.Linear8bitLt}


def _lora(model):
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_trains_on_every_preset_and_the_adapter_reloads(preset, tmp_path):
    backend = quantplug.get_backend("bitsandbytes")
    chosen = next(p for p in presets_of(backend) if p.name == preset)
    config = chosen.build(backend.config)
    model = tiny_llama()
    quantplug.quantize(model, config, progress=False)
    quantplug.save(model, tmp_path / "base")
    assert model.quantization_method == "bitsandbytes"
    assert model.is_loaded_in_4bit is bool(config.load_in_4bit)  # what PEFT reads

    model = _lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LORA_LAYERS[bool(config.load_in_4bit)])  # PEFT's bnb layer, not the generic one
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = token_ids(32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses  # it learns
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]  # quantized weights untouched

    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(quantplug.load(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        want, got = model(ids).logits, fresh(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_the_presets_trainable_flag_is_what_the_test_shows():
    backend = quantplug.get_backend("bitsandbytes")
    assert backend.capabilities.trainable is True
    assert all(p.trainable in (None, True) for p in presets_of(backend))
