"""quantplug-bnb: the bitsandbytes backend (LLM.int8() and 4-bit NF4 / FP4).

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
bitsandbytes are imported when the quantizer (``quantplug_bnb.quantizer``) is first used.
"""

import quantplug

from .config import BnbConfig

__all__ = ["BnbConfig", "SUPPORTED_BITSANDBYTES", "register_backends"]

#: the bitsandbytes releases this plugin is tested with (checked from installed metadata)
SUPPORTED_BITSANDBYTES = "bitsandbytes>=0.50,<0.51"


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="bitsandbytes",
            config=BnbConfig,
            quantizer="quantplug_bnb.quantizer:BnbQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(4, 8),
                devices=("cpu", "cuda"),
                needs_calibration=False,
                trainable=True,  # QLoRA: adapters train on top of the frozen bnb layers
                serializable=True,
                weight_dtypes=("int8", "nf4", "fp4"),
                activation_dtypes=("int8",),  # 8-bit mode only: LLM.int8() quantizes activations per row
                max_rel_error={8: 0.02, 4: 0.16},
            ),
            requires=(SUPPORTED_BITSANDBYTES,),
            description="bitsandbytes' own Linear8bitLt (LLM.int8()) and Linear4bit (NF4/FP4, double quant); "
            "checkpoints in Transformers' bitsandbytes layout.",
            notes="8-bit (LLM.int8()) also quantizes activations to int8 per row, except columns above "
            "llm_int8_threshold, which stay 16-bit; 4-bit keeps activations in bnb_4bit_compute_dtype.",
        )
    )
