"""LoRA through PEFT on quantplug's HQQ models (issue 19, part 1): PEFT wraps ``HQQLinear`` in its
HQQ LoRA layer; every preset trains, only the adapters change, and the saved adapter re-applies to
the model loaded fresh with ``quantplug.load`` (the conformance kit's ``quantplug.lora_check``).
This test is where the presets' ``trainable`` flag comes from."""

from __future__ import annotations

import pytest
from peft.tuners.lora.hqq import HqqLoraLinear  # no skip: the hqq tox env installs peft

import quantplug
from quantplug.candidates import presets_of
from quantplug.lora_check import check_lora

BACKEND = quantplug.get_backend("hqq")
PRESETS = presets_of(BACKEND)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_lora_trains_on_every_preset_and_the_adapter_reloads(preset, tmp_path):
    result = check_lora(preset.build(BACKEND.config), tmp_path)
    assert result["lora_layer"] is HqqLoraLinear


def test_the_presets_trainable_flag_is_what_the_test_shows():
    assert BACKEND.capabilities.trainable is True
    assert all(p.trainable in (None, True) for p in PRESETS)


def test_check_lora_targets_accepts_every_preset():
    from peft import LoraConfig

    from quantplug.testing import tiny_llama

    for preset in PRESETS:
        model = tiny_llama()
        quantplug.quantize(model, preset.build(BACKEND.config), progress=False)
        targets = quantplug.check_lora_targets(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        assert len(targets) == 4 and targets[0] == "model.layers.0.self_attn.q_proj"
