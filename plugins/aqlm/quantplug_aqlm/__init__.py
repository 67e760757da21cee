"""quantplug-aqlm: AQLM checkpoints (Transformers' ``quant_method: "aqlm"``), loaded and run on CPU
in plain PyTorch, saved back byte for byte. Load-only: quantizing with AQLM takes calibration on
GPUs with the authors' repository (github.com/Vahe1994/AQLM ``main.py``), not the aqlm package.

Importing this module imports no torch.
"""

import quantplug

from .config import AqlmConfig

__all__ = ["AqlmConfig", "register_backends"]


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="aqlm",
            config=AqlmConfig,
            quantizer="quantplug_aqlm.quantizer:AqlmQuantizer",
            capabilities=quantplug.Capabilities(
                # bits of codes per weight of the published schemes: 1x16 / 2x8 with groups of 8
                # are 2, 1x16 with groups of 16 is 1, 3x8 and 4x8 are 3 and 4
                bits=(1, 2, 3, 4),
                devices=("cpu",),
                needs_calibration=False,  # nothing to calibrate at load; quantizing is refused
                trainable=False,
                serializable=True,
                quantizes=False,
                weight_dtypes=("aqlm",),
            ),
            requires=(),  # plain PyTorch; aqlm itself is only the tests' oracle
            description="AQLM (additive quantization, 1-4 bits per weight: 1x16, 2x8, ... codebooks) "
            "checkpoints in Transformers' layout, run on CPU in plain PyTorch; load-only",
            notes="loads only: AQLM quantization is a multi-day GPU calibration in the authors' repository "
            "(github.com/Vahe1994/AQLM main.py), not in the aqlm package",
            transformers_format=True,
        )
    )
