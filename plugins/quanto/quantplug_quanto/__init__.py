"""quantplug-quanto: optimum-quanto's quantized modules and kernels behind quantplug's API, with
safetensors checkpoints that save and reload (Transformers 5.24 cannot serialize quanto models).

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
optimum-quanto (about 10 s to import) are imported when the quantizer (``quantplug_quanto.quantizer``)
is first used.
"""

import quantplug

from .config import QuantoConfig

__all__ = ["PRESETS", "QuantoConfig", "register_backends"]


# rel_error / bits_per_weight: one Linear(2048, 2048) with Gaussian weights and inputs through
# quantplug. Speeds vs the unquantized model: cuda from an H200 (bench/results/gpu.json: 4
# Llama-7B-sized blocks through quantplug, bf16, decode in a CUDA graph); cpu from SmolLM2-135M on a
# 2-core EPYC vs fp32 (noisy).
PRESETS = (
    quantplug.Preset(
        "int8",
        {"weights": "int8"},
        trainable=True,  # LoRA through PEFT: tests/test_lora.py
        bits=8,
        bits_per_weight=8.02,
        rel_error=0.008,
        speed={"cuda": {"decode": 0.16, "prefill": 0.66}, "cpu": {"decode": 0.42, "prefill": 1.0}},
    ),
    quantplug.Preset(
        "float8",
        {"weights": "float8"},
        trainable=True,  # LoRA through PEFT: tests/test_lora.py
        bits=8,
        bits_per_weight=8.02,
        rel_error=0.026,
    ),
    quantplug.Preset(
        "int8-a8",
        {"weights": "int8", "activations": "int8"},
        bits=8,
        bits_per_weight=8.02,
        needs_calibration=True,
        trainable=True,  # LoRA through PEFT: tests/test_lora.py (calibrated on token ids)
        note="static int8 activations: needs calibration data",
    ),
    quantplug.Preset(
        "int4",
        {"weights": "int4"},
        trainable=True,  # LoRA through PEFT: tests/test_lora.py
        bits=4,
        bits_per_weight=4.5,
        rel_error=0.098,
        speed={"cuda": {"decode": 1.41, "prefill": 0.047}, "cpu": {"decode": 0.31, "prefill": 0.72}},
    ),
    quantplug.Preset(
        "int2",
        {"weights": "int2"},
        trainable=True,  # LoRA through PEFT: tests/test_lora.py
        bits=2,
        bits_per_weight=2.5,
        rel_error=0.50,
        speed={"cpu": {"decode": 0.30, "prefill": 0.75}},
    ),
)


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="quanto",
            config=QuantoConfig,
            quantizer="quantplug_quanto.quantizer:QuantoQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(2, 4, 8),
                devices=("cpu", "cuda"),  # cuda: checked on an H200 by bench/gpu_run.sh (conformance kit)
                # weight-only configs need none; activations="int8"/"float8" do (the quantizer's
                # needs_calibration() says so per config and quantize() then requires calibration_data)
                needs_calibration=False,
                trainable=False,
                serializable=True,
                weight_dtypes=("int8", "int4", "int2", "float8"),
                activation_dtypes=("int8", "float8"),
                # 8 bits covers int8 and float8 weights, with or without calibrated int8/float8 activations
                max_rel_error={8: 0.06, 4: 0.16, 2: 0.75},
            ),
            requires=("optimum-quanto>=0.2.7,<0.3",),
            presets=PRESETS,
            description="optimum-quanto QLinear: int8/int4/int2/float8 weights, optional static int8/float8 "
            "activations calibrated with quantplug.quantize(..., calibration_data=...).",
            notes="optimum-quanto is in maintenance mode upstream (README notice, optimum-quanto#408, Nov 2025): "
            "bug fixes only, no new kernels or formats. Activation quantization needs calibration_data.",
        )
    )
