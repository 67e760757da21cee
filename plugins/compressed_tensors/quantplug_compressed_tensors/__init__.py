"""quantplug-compressed-tensors: the checkpoint format of llm-compressor, served natively by vLLM.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
compressed-tensors (seconds to import) are imported when the quantizer
(``quantplug_compressed_tensors.quantizer``) is first used.
"""

import quantplug

from .config import SCHEMES, CompressedTensorsConfig

__all__ = [
    "PRESETS",
    "SCHEMES",
    "SUPPORTED_COMPRESSED_TENSORS",
    "CompressedTensorsConfig",
    "register_backends",
]

SUPPORTED_COMPRESSED_TENSORS = "compressed-tensors>=0.20,<0.21"

#: vLLM reads these checkpoints with its compressed-tensors loader (README: the code path and schemes)
SERVABLE_BY = ("vllm",)

# rel_error measured by `python bench/preset_figures.py --backend compressed-tensors` (Intel Xeon,
# torch 2.13 CPU; bench/results/preset_figures.json): one bf16 Linear(2048, 2048, bias=False),
# N(0, 0.02) weights, 64 Gaussian input rows, relative output error against the dense layer.
# bits_per_weight = every stored tensor (scales, packed zero points) of the conformance kit's float32
# layer (quantplug.testing.measure_preset): the scales are float32 there (bf16 on a bf16 model:
# w4a16 4.125, w4a16_asym 4.16, w8a16 8.125). No speed is declared: the layers decompress their
# weight on every forward.
PRESETS = (
    quantplug.Preset(
        "w4a16",
        {"scheme": "W4A16"},
        bits=4,
        bits_per_weight=4.25,
        rel_error=0.11,
        servable_by=SERVABLE_BY,
        note="4-bit integer weights, groups of 128, symmetric; vLLM serves it with its Marlin / Machete kernels",
    ),
    quantplug.Preset(
        "w4a16_asym",
        {"scheme": "W4A16_ASYM"},
        bits=4,
        bits_per_weight=4.28,
        rel_error=0.10,
        servable_by=SERVABLE_BY,
        note="4-bit integer weights with zero points (the layout of llm-compressor's AWQ output)",
    ),
    quantplug.Preset(
        "w8a16",
        {"scheme": "W8A16"},
        bits=8,
        bits_per_weight=8.25,
        rel_error=0.0075,
        servable_by=SERVABLE_BY,
    ),
    quantplug.Preset(
        "w8a8",
        {"scheme": "W8A8"},
        bits=8,
        bits_per_weight=8.01,
        rel_error=0.014,
        servable_by=SERVABLE_BY,
        note="int8 weights per channel and int8 inputs per token (dynamic): vLLM runs int8 GEMMs",
    ),
    quantplug.Preset(
        "fp8",
        {"scheme": "FP8"},
        bits=8,
        bits_per_weight=8.0,
        rel_error=0.038,
        needs_calibration=True,
        servable_by=SERVABLE_BY,
        note="FP8 E4M3 weights per tensor and static per-tensor input scales (calibrated); vLLM needs a GPU "
        "with FP8 (compute capability 8.9+) for W8A8, else runs it weight-only",
    ),
    quantplug.Preset(
        "fp8_dynamic",
        {"scheme": "FP8_DYNAMIC"},
        bits=8,
        bits_per_weight=8.01,
        rel_error=0.038,
        servable_by=SERVABLE_BY,
        note="FP8 E4M3 weights per channel, inputs per token at run time (no calibration)",
    ),
)


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="compressed-tensors",
            transformers_format=True,  # Transformers' compressed-tensors integration reads these folders
            config=CompressedTensorsConfig,
            quantizer="quantplug_compressed_tensors.quantizer:CompressedTensorsQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(2, 3, 4, 8),
                devices=("cpu", "cuda"),
                needs_calibration=False,  # only static input scales (FP8, static W8A8) calibrate
                trainable=False,  # no PEFT LoRA step on these layers has been tested
                serializable=True,
                weight_dtypes=("int2", "int3", "int4", "int8", "float8_e4m3fn"),
                max_rel_error={8: 0.05, 4: 0.15, 3: 0.3, 2: 0.6},
            ),
            requires=(SUPPORTED_COMPRESSED_TENSORS,),
            presets=PRESETS,
            description="compressed-tensors checkpoints (llm-compressor's format, served natively by vLLM): "
            "pack-quantized W4A16/W8A16, int-quantized W8A8, float-quantized FP8, both ways.",
            notes="weight-only int4 / per-channel int8 layers of a bfloat16 / float16 model run quantplug's "
            "kernels on a CPU (torch's fused int4 / int8 matmuls); the others decompress their weight with "
            "compressed-tensors on every forward (vLLM has GPU kernels for them).",
        )
    )
