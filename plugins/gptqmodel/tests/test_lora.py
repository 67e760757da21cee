"""LoRA through PEFT on quantplug's GPTQ (GPTQModel) models (issue 19, part 1): a preset declares
``trainable=True`` exactly where the conformance kit's LoRA check passes on this machine (calibrated
on token ids, it trains, only the adapters change, the adapter reloads on ``quantplug.load``); the
others are shown not to train."""

from __future__ import annotations

import pytest

import quantplug
from quantplug.candidates import presets_of
from quantplug.lora_check import check_preset, why_not_here

BACKEND = quantplug.get_backend("gptq")


@pytest.mark.parametrize("preset", presets_of(BACKEND), ids=lambda p: p.name)
def test_trainable_is_what_the_lora_check_shows(preset, tmp_path):
    why = why_not_here(BACKEND, preset)
    if why is not None:
        assert not preset.trainable  # never claimed without the check
        pytest.skip(f"{preset.name}: {why}")
    check_preset(BACKEND, preset, tmp_path)
