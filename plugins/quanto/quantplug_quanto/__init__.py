"""quantplug-quanto: optimum-quanto's quantized modules and kernels behind quantplug's API, with
safetensors checkpoints that save and reload (Transformers 5.24 cannot serialize quanto models).

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
optimum-quanto (about 10 s to import) are imported when the quantizer (``quantplug_quanto.quantizer``)
is first used.
"""

import quantplug

from .config import QuantoConfig

__all__ = ["QuantoConfig", "register_backends"]


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="quanto",
            config=QuantoConfig,
            quantizer="quantplug_quanto.quantizer:QuantoQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(2, 4, 8),
                devices=("cpu",),
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
            description="optimum-quanto QLinear: int8/int4/int2/float8 weights, optional static int8/float8 "
            "activations calibrated with quantplug.quantize(..., calibration_data=...).",
            notes="optimum-quanto is in maintenance mode upstream (README notice, optimum-quanto#408, Nov 2025): "
            "bug fixes only, no new kernels or formats. Activation quantization needs calibration_data.",
        )
    )
