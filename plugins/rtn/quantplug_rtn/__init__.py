"""quantplug-rtn: the reference backend. Round-to-nearest weight quantization in plain PyTorch.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch
is imported when the quantizer (``quantplug_rtn.quantizer``) is first used.
"""

import quantplug

from .config import RtnConfig

__all__ = ["RtnConfig", "register_backends"]


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="rtn",
            config=RtnConfig,
            quantizer="quantplug_rtn.quantizer:RtnQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(2, 4, 8),
                devices=("cpu", "cuda", "mps"),
                needs_calibration=False,
                trainable=False,
                serializable=True,
                weight_dtypes=("int8", "int4", "int2"),
                max_rel_error={8: 0.02, 4: 0.16, 2: 0.75},
            ),
            requires=(),  # plain PyTorch: nothing beyond quantplug's own dependencies
            description="Round-to-nearest, per-channel or group-wise, symmetric or asymmetric; dequantize on forward.",
        )
    )
