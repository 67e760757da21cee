"""QLoRA through PEFT on quantplug's bitsandbytes models (issue 19, part 1): every preset trains
LoRA adapters with PEFT's own bitsandbytes LoRA layers, only the adapters change, and the saved
adapter re-applies to the model loaded fresh with ``quantplug.load`` (the conformance kit's
``quantplug.lora_check``). This test is where the presets' ``trainable`` flag comes from."""

from __future__ import annotations

import pytest
from peft.tuners.lora import bnb as lora_bnb  # no skip: the bnb tox env installs peft

import quantplug
from quantplug.candidates import presets_of
from quantplug.lora_check import check_lora, trainable_test
from quantplug.testing import tiny_llama

BACKEND = quantplug.get_backend("bitsandbytes")
PRESETS = presets_of(BACKEND)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_lora_trains_on_every_preset_and_the_adapter_reloads(preset, tmp_path):
    config = preset.build(BACKEND.config)
    result = check_lora(config, tmp_path)
    # PEFT's bitsandbytes LoRA layer, not its generic one: it found the attributes it reads
    assert result["lora_layer"] is (lora_bnb.Linear4bit if config.load_in_4bit else lora_bnb.Linear8bitLt)


def test_a_quantized_model_carries_what_peft_reads():
    model = tiny_llama()
    quantplug.quantize(model, {"quant_method": "bitsandbytes", "load_in_4bit": True}, progress=False)
    assert (model.is_loaded_in_4bit, model.is_loaded_in_8bit, model.quantization_method) == (
        True, False, "bitsandbytes",
    )  # fmt: skip


def test_the_presets_trainable_flag_is_what_the_test_shows():
    assert BACKEND.capabilities.trainable is True
    assert all(p.trainable in (None, True) for p in PRESETS)


# the flag against the check again, and check_lora_targets against the flag (the kit's test)
test_trainable_is_what_the_lora_check_shows = trainable_test("bitsandbytes")
