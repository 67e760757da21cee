"""quantplug-autoround: Intel's AutoRound through quantplug.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
``auto_round`` (up to ~30 s to import) are imported when the quantizer
(``quantplug_autoround.quantizer``) is first used.
"""

import quantplug

from .config import AutoRoundConfig

__all__ = ["PRESETS", "AutoRoundConfig", "register_backends"]

# Figures: see the comment above each; measured through quantplug (AutoRoundQuantizer), torch 2.13
# CPU, auto-round 0.16.1 + auto-round-lib 0.16.0, on a 2-core EPYC.
PRESETS = (
    quantplug.Preset(
        "int4-g128",
        {"bits": 4, "group_size": 128, "sym": True},
        bits=4,
        bits_per_weight=4.16,
        rel_error=0.09,
        needs_calibration=True,
    ),
    quantplug.Preset(
        "int4-g32",
        {"bits": 4, "group_size": 32, "sym": True},
        bits=4,
        bits_per_weight=4.62,
        rel_error=0.08,
        needs_calibration=True,
    ),
    quantplug.Preset(
        "int8-g128",
        {"bits": 8, "group_size": 128, "sym": True},
        bits=8,
        bits_per_weight=8.16,
        rel_error=0.006,
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
                bits=(2, 4, 8),
                devices=("cpu", "cuda"),
                needs_calibration=True,
                trainable=False,  # no backward through auto-round's packed layers was tested
                serializable=True,
                weight_dtypes=("int8", "int4", "int2"),
                max_rel_error={8: 0.02, 4: 0.14, 2: 0.75},
            ),
            requires=("auto-round>=0.16.1,<0.17",),
            presets=PRESETS,
            description="AutoRound: sign-gradient tuned rounding and min/max per block from calibration data; "
            "auto-round's packed QuantLinear and its inference kernels.",
            notes="needs calibration data (token ids); import of auto_round takes up to ~30 s; on CPU install "
            "auto-round-lib for its kernel (else auto-round's torch backend)",
        )
    )
