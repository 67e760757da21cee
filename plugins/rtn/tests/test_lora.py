"""LoRA through PEFT on quantplug's rtn models (issue 19, part 1): PEFT refuses the layer class
("Target module ... is not supported"), so no preset declares ``trainable``; the kit's test shows
the check fails on every preset, and that ``quantplug.check_lora_targets`` refuses the targets
with the layers named."""

from quantplug.lora_check import trainable_test

test_trainable_is_what_the_lora_check_shows = trainable_test("rtn")
