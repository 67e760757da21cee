"""quantplug-autoround: Intel's AutoRound through quantplug.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
``auto_round`` (up to ~30 s to import) are imported when the quantizer
(``quantplug_autoround.quantizer``) is first used.
"""

import quantplug

from .config import AutoRoundConfig

__all__ = ["PRESETS", "AutoRoundConfig", "register_backends"]

# bits_per_weight / rel_error: bench/presets.py through quantplug (torch 2.13 CPU, auto-round 0.16.1 +
# auto-round-lib 0.16.0, 2-core EPYC): one float32 Linear(2048, 2048) with N(0, 1) weights, calibrated
# on 4 x 32 Gaussian input rows at the default iters=50, error on 64 other rows; bits per weight =
# bytes of qweight + qzeros + scales (float16) x 8 / weights. No speed figures were measured. On this
# structureless data the tuning overfits the calibration rows (int4-g128: 0.054 on them at iters=50 vs
# 0.096 at iters=0), so the held-out figures here are no better than round-to-nearest's.
PRESETS = (
    quantplug.Preset(
        "int4-g128",
        {"bits": 4, "group_size": 128, "sym": True},
        bits=4,
        bits_per_weight=4.16,
        rel_error=0.106,
        needs_calibration=True,
    ),
    quantplug.Preset(
        "int4-g32",
        {"bits": 4, "group_size": 32, "sym": True},
        bits=4,
        bits_per_weight=4.62,
        rel_error=0.094,
        needs_calibration=True,
    ),
    quantplug.Preset(
        "int8-g128",
        {"bits": 8, "group_size": 128, "sym": True},
        bits=8,
        bits_per_weight=8.19,
        rel_error=0.010,
        needs_calibration=True,
    ),
)


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="auto-round",
            config=AutoRoundConfig,
            quantizer="quantplug_autoround.quantizer:AutoRoundQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(2, 3, 4, 8),  # 3 bits: auto-round's torch backend (auto-round-lib runs 2, 4, 8)
                devices=(
                    "cpu",
                ),  # the CUDA path (AutoRound on the GPU, auto-round's CUDA kernels) is untested
                needs_calibration=True,
                trainable=False,  # PEFT refuses auto-round's QuantLinear: tests/test_lora.py
                serializable=True,
                weight_dtypes=("int8", "int4", "int3", "int2"),
                # The kit's Linear(512, 256), N(0, 0.02) weights, default iters (bench/presets.py), at
                # groups 128 / 64 / 32: 2 bits 0.40-0.38, 3 bits 0.21-0.19, 4 bits 0.107-0.10, 8 bits below.
                max_rel_error={8: 0.02, 4: 0.15, 3: 0.3, 2: 0.6},
            ),
            requires=("auto-round>=0.16.1,<0.17",),
            presets=PRESETS,
            # Transformers (with auto-round installed) loads what this plugin writes: checked in a fresh
            # process by tests/test_interop.py
            transformers_format=True,
            description="AutoRound: sign-gradient tuned rounding and min/max per block from calibration data; "
            "auto-round's packed QuantLinear and its inference kernels.",
            notes="needs calibration data (token ids); import of auto_round takes up to ~30 s; on CPU install "
            "auto-round-lib for its kernel (else auto-round's torch backend)",
        )
    )
