"""LoRA through PEFT on quantplug's AutoRound models (issue 19, part 1): a preset declares
``trainable=True`` exactly where the conformance kit's LoRA check passes on this machine (calibrated
on token ids, it trains, only the adapters change, the adapter reloads on ``quantplug.load``); the
others are shown not to train."""

from quantplug.lora_check import trainable_test

test_trainable_is_what_the_lora_check_shows = trainable_test("auto-round")
