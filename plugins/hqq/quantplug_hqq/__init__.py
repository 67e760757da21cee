"""quantplug-hqq: HQQ (Half-Quadratic Quantization) through quantplug.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
``hqq.core.quantize`` (about 8 s to import) are imported when the quantizer
(``quantplug_hqq.quantizer``) is first used.
"""

import quantplug

from .config import HqqConfig

__all__ = ["PRESETS", "HqqConfig", "register_backends"]


# rel_error / bits_per_weight: one Linear(2048, 2048) with Gaussian weights and inputs through
# quantplug (hqq keeps scale and zero in the compute dtype: 1 bit per weight at group 64).
# bits_per_weight rechecked (issue 20) on a float32 Linear(2048, 2048) through HqqQuantizer:
# bytes of W_q and of the scale / zero tensors in HQQLinear.meta x 8 / weights = 9.0, 5.0, 4.2002,
# 6.0, as declared (on a bf16 model: 8.5, 4.5, 3.7, 4.0).
# Speeds vs the unquantized model: cuda from an H200 (bench/results/gpu.json: 4 Llama-7B-sized
# blocks through quantplug, hqq's torch backend, bf16); cpu from SmolLM2-135M on a 2-core EPYC vs
# fp32 (noisy).
PRESETS = (
    quantplug.Preset(
        "8bit-g64",
        {"nbits": 8, "group_size": 64},
        bits=8,
        bits_per_weight=9.0,
        rel_error=0.005,
        speed={"cpu": {"decode": 0.15}},
    ),
    quantplug.Preset(
        "4bit-g64",
        {"nbits": 4, "group_size": 64},
        bits=4,
        bits_per_weight=5.0,
        rel_error=0.086,
        speed={"cuda": {"decode": 0.08, "prefill": 0.46}, "cpu": {"decode": 0.06}},
    ),
    quantplug.Preset(
        "3bit-g64",
        # axis=0 (groups down an input column), as hqq's README advises at low bits: SmolLM2-135M
        # perplexity 47.7 vs 114.6 with axis=1 (fp32 14.2; bench/low_bit.py, issue 20 item 7).
        # rel_error re-measured as above with axis=0: 0.184 (axis=1 0.184); bits_per_weight 4.5 with
        # axis=0 (a float32 Linear(2048, 2048), every stored tensor counted; 4.2 with axis=1).
        {"nbits": 3, "group_size": 64, "axis": 0},
        bits=3,
        bits_per_weight=4.5,
        rel_error=0.18,
        note="groups along the output dimension (axis=0: hqq's advice at low bits); out_features must "
        "be a multiple of 64",
        speed={"cpu": {"decode": 0.04}},
    ),
    quantplug.Preset(
        "2bit-g16",
        {"nbits": 2, "group_size": 16},
        bits=2,
        bits_per_weight=6.0,
        rel_error=0.30,
        # larger than 4bit-g64 and far worse on a float32 model: select sets it aside as dominated
        note="2-bit needs small groups; at group 16 the metadata makes it larger than 4-bit g64",
        speed={"cpu": {"decode": 0.04}},
    ),
)


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="hqq",
            config=HqqConfig,
            quantizer="quantplug_hqq.quantizer:HqqQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(1, 2, 3, 4, 8),
                devices=("cpu", "cuda"),
                needs_calibration=False,
                trainable=True,  # LoRA through PEFT (its HqqLoraLinear), every preset: tests/test_lora.py
                serializable=True,
                weight_dtypes=("uint8", "uint4", "uint3", "uint2", "uint1"),
                # Measured on the kit's Linear(512, 256), group 64 / 128, fp32: 0.005, 0.085-0.096,
                # 0.18-0.20, 0.42-0.47, 1.03-1.04 (1-bit output is as large as the error: see README).
                max_rel_error={8: 0.02, 4: 0.14, 3: 0.28, 2: 0.6, 1: 1.15},
            ),
            requires=("hqq>=0.2.8,<0.3",),
            presets=PRESETS,
            description="HQQ: calibration-free half-quadratic optimization of scale/zero per group; hqq's HQQLinear.",
            notes="quantizing is slow on CPU (HQQ's optimizer: seconds per large layer); "
            "HQQLinear ignores .to(): quantize or load on the target device",
        )
    )
