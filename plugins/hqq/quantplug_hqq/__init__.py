"""quantplug-hqq: HQQ (Half-Quadratic Quantization) through quantplug.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
``hqq.core.quantize`` (about 8 s to import) are imported when the quantizer
(``quantplug_hqq.quantizer``) is first used.
"""

import quantplug

from .config import HqqConfig

__all__ = ["HqqConfig", "register_backends"]


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
                trainable=False,  # no PEFT LoRA step on HQQLinear was tested (peft is not installed here)
                serializable=True,
                weight_dtypes=("uint8", "uint4", "uint3", "uint2", "uint1"),
                # Measured on the kit's Linear(512, 256), group 64 / 128, fp32: 0.005, 0.085-0.096,
                # 0.18-0.20, 0.42-0.47, 1.03-1.04 (1-bit output is as large as the error: see README).
                max_rel_error={8: 0.02, 4: 0.14, 3: 0.28, 2: 0.6, 1: 1.15},
            ),
            requires=("hqq>=0.2.8,<0.3",),
            description="HQQ: calibration-free half-quadratic optimization of scale/zero per group; hqq's HQQLinear.",
            notes="quantizing is slow on CPU (HQQ's optimizer: seconds per large layer); "
            "HQQLinear ignores .to(): quantize or load on the target device",
        )
    )
