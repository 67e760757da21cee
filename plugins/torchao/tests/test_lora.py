"""LoRA through PEFT on quantplug's torchao models (issue 19, part 1): a preset declares
``trainable=True`` exactly where the conformance kit's LoRA check passes on this machine (it trains,
only the adapters change, the adapter reloads on ``quantplug.load``); the others are shown not to
train, or are not runnable here (CUDA-only) and keep the backend's False. Calibrated presets are
calibrated on token ids first."""

from quantplug.lora_check import trainable_test

test_trainable_is_what_the_lora_check_shows = trainable_test("torchao")
