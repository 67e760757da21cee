"""LoRA through PEFT on quantplug's torchao models (issue 19, part 1): a preset declares
``trainable=True`` exactly where the conformance kit's LoRA check passes on this machine (it trains,
only the adapters change, the adapter reloads on ``quantplug.load``); the others are shown not to
train, or are not runnable here (CUDA-only, or calibrated) and keep the backend's False."""

from __future__ import annotations

import pytest

import quantplug
from quantplug.candidates import presets_of
from quantplug.lora_check import check_lora

BACKEND = quantplug.get_backend("torchao")
PRESETS = presets_of(BACKEND)


def _runs_here(preset) -> str | None:
    """Why the check cannot run this preset on a CPU (None: it can)."""
    config = preset.build(BACKEND.config)
    quantizer = quantplug.AutoQuantizer.from_config(config)
    if quantizer.needs_calibration():
        return "needs calibration data"
    try:
        quantizer.validate_environment("cpu")
    except quantplug.QuantplugError as exc:
        return str(exc).splitlines()[0]
    return None


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_trainable_is_what_the_lora_check_shows(preset, tmp_path):
    why = _runs_here(preset)
    if why is not None:
        assert not preset.trainable  # never claimed without the check
        pytest.skip(f"{preset.name}: {why}")
    trainable = preset.trainable if preset.trainable is not None else BACKEND.capabilities.trainable
    if trainable:
        result = check_lora(preset.build(BACKEND.config), tmp_path)
        assert result["reload_max_diff"] <= 1e-5
    else:
        with pytest.raises((AssertionError, RuntimeError)):
            check_lora(preset.build(BACKEND.config), tmp_path)
