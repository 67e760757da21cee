"""LoRA through PEFT on quantplug's HQQ models (issue 19, part 1): PEFT wraps ``HQQLinear`` in its
HQQ LoRA layer; every preset trains, only the adapters change, and the saved adapter re-applies to
the model loaded fresh with ``quantplug.load`` (the conformance kit's ``quantplug.lora_check``).
This test is where the presets' ``trainable`` flag comes from."""

from __future__ import annotations

import pytest
from peft.tuners.lora.hqq import HqqLoraLinear  # no skip: the hqq tox env installs peft

import quantplug
from quantplug.candidates import presets_of
from quantplug.lora_check import check_lora, trainable_test

BACKEND = quantplug.get_backend("hqq")
PRESETS = presets_of(BACKEND)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_lora_trains_on_every_preset_and_the_adapter_reloads(preset, tmp_path):
    result = check_lora(preset.build(BACKEND.config), tmp_path)
    assert result["lora_layer"] is HqqLoraLinear


def test_the_presets_trainable_flag_is_what_the_test_shows():
    assert BACKEND.capabilities.trainable is True
    assert all(p.trainable in (None, True) for p in PRESETS)


# the flag against the check again, and check_lora_targets against the flag (the kit's test)
test_trainable_is_what_the_lora_check_shows = trainable_test("hqq")
