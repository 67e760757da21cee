"""quantplug-rtn: the reference backend. Round-to-nearest weight quantization in plain PyTorch.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch
is imported when the quantizer (``quantplug_rtn.quantizer``) is first used.
"""

import quantplug

from .config import RtnConfig

__all__ = ["PRESETS", "RtnConfig", "register_backends"]


# rel_error and bits_per_weight: one Linear(2048, 2048), Gaussian weights and inputs, through
# quantplug (fp32 scales). bits_per_weight = bits + 32 bits of fp32 scale per group, + 32 more for
# the fp32 zero (the group minimum) when asymmetric: g32-asym = bits + (32 + 32) / 32; per channel
# (int8) 8 + 32 / 2048. The presets with dtype="bfloat16" run torch's fused CPU kernels (the core's
# torch-int8-cpu / torch-int4-cpu, quantplug.KernelLinear) in a bfloat16 model, and declare what such
# a layer holds in memory: for int4, the packed codes and a (scale, zero) pair per group for the
# kernel, 4 + 32 / group bits per weight (the checkpoint stores 4 + 16 / group; the kernel's bfloat16
# scales are the grid's, so they are not kept twice).
# CPU speeds vs the fp32 model: the fused presets from `quantplug compare` on SmolLM2-135M, 2-core
# Intel Xeon with AVX-512 BF16 (bench/results/fused_cpu_compare/, bench/RESULTS.md "Fused CPU
# kernels"); the others dequantize the whole weight on every forward (SmolLM2-135M on a 2-core EPYC,
# bench/results/quality.md).
# cuda: an H200, 4 Llama-7B-sized blocks vs bf16 (bench/results/gpu.json): 15x slower at decode.
_CPU = {"decode": 0.35, "prefill": 0.75}
_CUDA = {"decode": 0.067, "prefill": 0.41}
PRESETS = (
    quantplug.Preset(
        "int8",
        {"bits": 8, "group_size": -1},
        bits=8,
        bits_per_weight=8.02,
        rel_error=0.008,
        speed={"cpu": {"decode": 1.25, "prefill": 1.91}, "cuda": _CUDA},
        dtype="bfloat16",
    ),
    quantplug.Preset(
        "int4-g32",
        {"bits": 4, "group_size": 32},
        bits=4,
        bits_per_weight=5.0,
        rel_error=0.097,
        speed={"cpu": {"decode": 1.51, "prefill": 1.52}, "cuda": _CUDA},
        dtype="bfloat16",
    ),
    quantplug.Preset(
        "int4-g32-asym",
        {"bits": 4, "group_size": 32, "symmetric": False},
        bits=4,
        bits_per_weight=6.0,
        rel_error=0.078,
        speed={"cpu": {"decode": 0.28, "prefill": 0.75}, "cuda": _CUDA},
    ),
    quantplug.Preset(
        "int4-g128",
        {"bits": 4, "group_size": 128},
        bits=4,
        bits_per_weight=4.25,
        rel_error=0.116,
        speed={"cpu": {"decode": 1.57, "prefill": 1.63}, "cuda": _CUDA},
        dtype="bfloat16",
    ),
    quantplug.Preset(
        "int2-g32-asym",
        {"bits": 2, "group_size": 32, "symmetric": False},
        bits=2,
        bits_per_weight=4.0,
        rel_error=0.39,
        speed={"cpu": {"decode": 0.29, "prefill": 0.75}, "cuda": _CUDA},
    ),
)


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
            presets=PRESETS,
            description="Round-to-nearest, per-channel or group-wise, symmetric or asymmetric; symmetric int8 / int4 layers in bfloat16 run the core's fused CPU kernels, else dequantize on forward.",
        )
    )
