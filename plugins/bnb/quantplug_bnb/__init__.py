"""quantplug-bnb: the bitsandbytes backend (LLM.int8() and 4-bit NF4 / FP4).

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
bitsandbytes are imported when the quantizer (``quantplug_bnb.quantizer``) is first used.
"""

import quantplug

from .config import BnbConfig

__all__ = ["PRESETS", "BnbConfig", "SUPPORTED_BITSANDBYTES", "register_backends"]

#: the bitsandbytes releases this plugin is tested with (checked from installed metadata)
SUPPORTED_BITSANDBYTES = "bitsandbytes>=0.50,<0.51"


# rel_error / bits_per_weight: one Linear(2048, 2048) with Gaussian weights and inputs through
# quantplug. Speeds vs the unquantized model: cuda from an H200 (bench/results/gpu.json: 4
# Llama-7B-sized blocks quantized through quantplug, bf16; decode = 1 token in a CUDA graph where
# capture works, prefill = 2048 tokens); cpu from SmolLM2-135M on a 2-core EPYC vs fp32 (noisy).
PRESETS = (
    quantplug.Preset(
        "int8",
        {"load_in_8bit": True},
        bits=8,
        bits_per_weight=8.02,
        rel_error=0.008,
        speed={"cuda": {"decode": 0.034, "prefill": 0.21}, "cpu": {"decode": 0.5, "prefill": 0.33}},
        note="LLM.int8(): int8 activations too; 30x slower than bf16 at decode on an H200 (no CUDA graph capture)",
    ),
    quantplug.Preset(
        "nf4",
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"},
        bits=4,
        bits_per_weight=4.5,
        rel_error=0.092,
        speed={"cuda": {"decode": 1.10, "prefill": 0.87}, "cpu": {"decode": 0.6, "prefill": 0.85}},
        note="QLoRA's format",
    ),
    quantplug.Preset(
        "nf4-dq",
        {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        },
        bits=4,
        bits_per_weight=4.13,
        rel_error=0.092,
        speed={"cuda": {"decode": 1.05, "prefill": 0.85}, "cpu": {"decode": 0.55, "prefill": 0.8}},
        note="double quantization: scales quantized again, 0.37 bit per weight less than nf4",
    ),
    quantplug.Preset(
        "fp4",
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "bfloat16"},
        bits=4,
        bits_per_weight=4.5,
        rel_error=0.121,
        speed={"cuda": {"decode": 1.10, "prefill": 0.87}, "cpu": {"decode": 0.6, "prefill": 0.85}},
    ),
)


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="bitsandbytes",
            transformers_format=True,  # Transformers' bitsandbytes checkpoints, both ways
            config=BnbConfig,
            quantizer="quantplug_bnb.quantizer:BnbQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(4, 8),
                devices=("cpu", "cuda"),
                needs_calibration=False,
                trainable=True,  # QLoRA through PEFT, every preset: tests/test_lora.py
                serializable=True,
                weight_dtypes=("int8", "nf4", "fp4"),
                activation_dtypes=("int8",),  # 8-bit mode only: LLM.int8() quantizes activations per row
                max_rel_error={8: 0.02, 4: 0.16},
            ),
            requires=(SUPPORTED_BITSANDBYTES,),
            presets=PRESETS,
            description="bitsandbytes' own Linear8bitLt (LLM.int8()) and Linear4bit (NF4/FP4, double quant); "
            "checkpoints in Transformers' bitsandbytes layout.",
            notes="8-bit (LLM.int8()) also quantizes activations to int8 per row, except columns above "
            "llm_int8_threshold, which stay 16-bit; 4-bit keeps activations in bnb_4bit_compute_dtype.",
        )
    )
