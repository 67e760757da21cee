"""quantplug-gptqmodel: GPTQ through GPTQModel (the library Transformers uses for GPTQ).

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
gptqmodel (several seconds to import) are imported when the quantizer
(``quantplug_gptqmodel.quantizer``) is first used.
"""

import quantplug

from .awq_config import AwqConfig
from .config import GptqConfig

__all__ = ["PRESETS", "AwqConfig", "GptqConfig", "SUPPORTED_GPTQMODEL", "register_backends"]

#: GPTQModel 7.7 needs torch >= 2.14.1; 7.6 is the release that runs with torch 2.13
SUPPORTED_GPTQMODEL = "gptqmodel>=7.6,<7.7"

# bits_per_weight / rel_error: one Linear(2048, 2048, bias=False) with Gaussian weights, quantized
# through quantplug on 4 x 256 Gaussian calibration rows, tested on other Gaussian rows (every stored
# tensor counted: qweight, qzeros, fp16 scales, g_idx). Isotropic inputs give GPTQ nothing to
# exploit, so these errors equal round-to-nearest's; on real text GPTQ's gain shows (bench/RESULTS.md,
# section "calibrated"). No speed is declared: GPTQModel's torch kernel dequantizes on every forward.
PRESETS = (
    quantplug.Preset(
        "int4-g128",
        {"bits": 4, "group_size": 128},
        bits=4,
        bits_per_weight=4.17,
        rel_error=0.09,
        note="the hub's most common GPTQ format",
    ),
    quantplug.Preset(
        "int4-g128-act-order",
        {"bits": 4, "group_size": 128, "desc_act": True},
        bits=4,
        bits_per_weight=4.17,
        rel_error=0.09,
        note="act-order (desc_act): columns quantized by decreasing Hessian diagonal",
    ),
    quantplug.Preset(
        "int3-g128",
        {"bits": 3, "group_size": 128},
        bits=3,
        bits_per_weight=3.16,
        rel_error=0.20,
    ),
    quantplug.Preset(
        "int8-g128",
        {"bits": 8, "group_size": 128},
        bits=8,
        bits_per_weight=8.20,
        rel_error=0.005,
    ),
)


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="gptq",
            transformers_format=True,  # Transformers' (optimum + GPTQModel) gptq checkpoints, both ways
            config=GptqConfig,
            quantizer="quantplug_gptqmodel.quantizer:GptqQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(2, 3, 4, 8),
                devices=("cpu", "cuda"),
                needs_calibration=True,
                trainable=True,  # LoRA through PEFT's GPTQ layer on every preset: tests/test_lora.py
                serializable=True,
                weight_dtypes=("int2", "int3", "int4", "int8"),
                max_rel_error={8: 0.02, 4: 0.15, 3: 0.3, 2: 0.6},
            ),
            requires=(SUPPORTED_GPTQMODEL,),
            presets=PRESETS,
            description="GPTQ (Hessian-based rounding with error feedback, calibrated) by GPTQModel; "
            "checkpoints in the gptq format Transformers, vLLM and AutoGPTQ read.",
            notes="needs calibration data (a few hundred tokens of representative text at least); "
            "4-bit layers of a bfloat16 / float16 model run quantplug's int4 kernel on a CPU (torch's fused "
            "int4 matmul, act-order too); the others, and every layer on a GPU, GPTQModel's torch kernel "
            "(dequantize + matmul). Calibrate a float32 model: in bfloat16 GPTQ is ~40x slower on a CPU.",
        )
    )
    register(
        quantplug.Backend(
            name="awq",
            transformers_format=True,  # the AWQ gemm layout Transformers (through GPTQModel) reads
            config=AwqConfig,
            quantizer="quantplug_gptqmodel.awq:AwqQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(4,),
                devices=("cpu", "cuda"),
                quantizes=False,  # GPTQModel's AWQ quantizer is CUDA-only and not wired in
                serializable=True,
                weight_dtypes=("int4",),
            ),
            requires=(SUPPORTED_GPTQMODEL,),
            description="loads AWQ checkpoints (gemm layout, from AutoAWQ, GPTQModel, auto-round) with "
            "GPTQModel's torch AWQ kernel; re-saves them unchanged.",
            notes="load only: quantizing with AWQ is refused (GPTQModel's AWQ quantizer needs CUDA and is "
            "not wired into quantplug-gptqmodel).",
        )
    )
