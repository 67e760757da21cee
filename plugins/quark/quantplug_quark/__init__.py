"""quantplug-quark: loads AMD Quark exports (``quant_method: "quark"``) in plain PyTorch.

Read (``quantplug_quark.specs``): fp8 e4m3 weights per tensor / per channel, int8 / uint8 per tensor /
per channel, int4 / uint4 per channel or per group (packed eight per int32, ``export.pack_method``
"reorder" or "order", zero points for asymmetric ones), MXFP4 (e2m1 two per byte, an e8m0 scale
per 32 inputs); static per-tensor fp8 / int8 activation and output (KV-cache) scales and dynamic
MXFP4 activations, applied as Quark's fake quantization on every forward. Other schemes are
refused by name. Quark quantizes with its own ``ModelQuantizer``; this backend loads what it
exports (``Capabilities(quantizes=False)``) and saves it back byte for byte. Importing this module
imports no torch.
"""

import quantplug

from .config import QuarkConfig

__all__ = ["QuarkConfig", "register_backends"]


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="quark",
            config=QuarkConfig,
            quantizer="quantplug_quark.quantizer:QuarkQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(4, 8),
                devices=("cpu",),  # the code is device-agnostic PyTorch, but only the CPU was tested
                needs_calibration=False,
                trainable=False,
                serializable=True,
                quantizes=False,
                weight_dtypes=("float8_e4m3fn", "int8", "uint8", "int4", "uint4", "fp4"),
                activation_dtypes=("float8_e4m3fn", "int8", "uint8", "fp4"),
            ),
            requires=(),  # plain PyTorch; amd-quark is only the tests' oracle
            description="AMD Quark exports (fp8, int8, packed int4, MXFP4 weights; static fp8/int8 and "
            "dynamic MXFP4 activations): load-only, pure PyTorch, weights dequantized per layer on every forward",
            transformers_format=True,
        )
    )
