"""quantplug-torchao: torchao's quantization (int8, int4, intx, float8) behind quantplug's API.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
torchao are imported when the quantizer (``quantplug_torchao.quantizer``) is first used.
"""

from __future__ import annotations

import quantplug

from .config import MODE_DEVICES, MODE_REQUIREMENTS, MODES, TorchaoConfig

__all__ = [
    "MODES",
    "MODE_DEVICES",
    "MODE_REQUIREMENTS",
    "TorchaoConfig",
    "register_backends",
]


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="torchao",
            config=TorchaoConfig,
            quantizer="quantplug_torchao.quantizer:TorchaoQuantizer",
            capabilities=quantplug.Capabilities(
                # 8: int8 weight-only / dynamic, float8; 4: int4 (CUDA) and intx; 2-7: intx.
                bits=(2, 3, 4, 5, 6, 7, 8),
                # The union over modes. Per mode: int4_weight_only and float8 dynamic need CUDA
                # (float8 dynamic: compute capability >= 8.9); the others run on cpu and cuda.
                # TorchaoQuantizer.validate_environment enforces the per-mode rules.
                devices=("cpu", "cuda"),
                needs_calibration=False,
                trainable=False,
                serializable=True,
                # intx is stored unpacked, one value per int8 byte (torchao's UNPACKED_TO_INT8).
                weight_dtypes=("int8", "int4", "intx", "float8_e4m3fn"),
                activation_dtypes=("int8", "float8_e4m3fn"),
                max_rel_error={8: 0.04, 7: 0.025, 6: 0.045, 5: 0.09, 4: 0.16, 3: 0.35, 2: 0.75},
            ),
            requires=("torchao>=0.18,<0.19",),
            description=(
                "torchao quantize_: int8 weight-only / dynamic-activation, int4 (CUDA), intx 2-8 bit "
                "group-wise, float8 weight-only / dynamic (CUDA cc>=8.9); Transformers TorchAoConfig checkpoints."
            ),
            notes=(
                "Per mode: int4_weight_only needs CUDA (or mslk); float8 dynamic needs CUDA cc>=8.9; intx is "
                "stored one value per byte. torchao's API churns: only 0.18 is supported."
            ),
        )
    )
