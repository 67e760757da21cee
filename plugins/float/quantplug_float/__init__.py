"""quantplug-float: the float formats Transformers reads, in plain PyTorch on any device.

Backends (each named as Transformers names the method, checkpoints in Transformers' exact layout):
- ``fp8``: fine-grained FP8 (DeepSeek-V3/R1, Qwen3-*-FP8, MiniMax): e4m3 weights, a float32 scale
  per 128x128 tile (or per tensor); MoE experts kept stacked.
- ``mxfp8``: e4m3 weights, an e8m0 (power-of-two) scale per 32 inputs.
- ``fbgemm_fp8``: e4m3 weights, one float32 scale per output row (Meta's Llama FP8 releases).
- ``mxfp4``: gpt-oss's MoE experts, e2m1 values with an e8m0 scale per 32 inputs.

A loaded model keeps the bytes (1 per fp8 weight, 0.53 per mxfp4 one) and dequantizes one layer
(one expert) at a time on every forward. Importing this module imports no torch.
"""

import quantplug

from .config import FbgemmFp8Config, Fp8Config, Mxfp4Config, Mxfp8Config

__all__ = ["PRESETS", "FbgemmFp8Config", "Fp8Config", "Mxfp4Config", "Mxfp8Config", "register_backends"]

# bits_per_weight and rel_error: the kit's preset layer, Linear(2048, 2048) with N(0, 0.02)
# weights in bfloat16 (quantplug.preset_check). CPU speed vs the float32 model: SmolLM2-135M loaded
# in bfloat16, 2-core Intel Xeon (AVX-512 BF16, AMX), `python bench/float.py` (bench/RESULTS.md
# "Float formats"; the bfloat16 model itself: decode 0.84x, prefill 2.3x there).
_FP8_NOTE = (
    "weight-only on CPU: e4m3 codes dequantized per layer into bfloat16 on every forward; cpu speed measured "
    "on a 2-core Intel Xeon (AVX-512 BF16)"
)


def _cpu(decode: float, prefill: float) -> dict:
    return {"cpu": {"decode": decode, "prefill": prefill}}


PRESETS = {
    "fp8": (
        quantplug.Preset(
            "fp8-block128",
            {"weight_block_size": [128, 128]},
            bits=8,
            bits_per_weight=8.002,
            rel_error=0.026,
            speed=_cpu(0.32, 1.57),
            dtype="bfloat16",
            note=_FP8_NOTE,
        ),
        quantplug.Preset(
            "fp8-tensor",
            {"weight_block_size": None},
            bits=8,
            bits_per_weight=8.0,
            rel_error=0.027,
            speed=_cpu(0.38, 1.42),
            dtype="bfloat16",
            note=_FP8_NOTE,
        ),
    ),
    "mxfp8": (
        quantplug.Preset(
            "mxfp8",
            {},
            bits=8,
            bits_per_weight=8.25,
            rel_error=0.027,
            speed=_cpu(0.28, 1.28),
            dtype="bfloat16",
            note=_FP8_NOTE,
        ),
    ),
    "fbgemm_fp8": (
        quantplug.Preset(
            "fbgemm-fp8",
            {},
            bits=8,
            bits_per_weight=8.016,
            rel_error=0.026,
            speed=_cpu(0.38, 1.36),
            dtype="bfloat16",
            note=_FP8_NOTE,
        ),
    ),
    # gpt-oss's experts only (a model without them is refused); figures: one expert projection
    # [2048, 2048], N(0, 0.02) weights in bfloat16, 64 Gaussian rows (no Linear layer takes this format)
    "mxfp4": (
        quantplug.Preset(
            "mxfp4",
            {},
            bits=4,
            bits_per_weight=4.25,
            rel_error=0.119,
            dtype="bfloat16",
            model_types=("gpt_oss",),
            note="gpt-oss (GptOssExperts) only: its experts in e2m1 with an e8m0 scale per 32 inputs, dequantized "
            "per routed expert; Linear layers stay in full precision",
        ),
    ),
}

_CAPS = dict(
    bits=(8,),
    devices=("cpu", "cuda", "mps"),
    needs_calibration=False,
    trainable=False,
    serializable=True,
    weight_dtypes=("float8_e4m3fn",),
    max_rel_error={8: 0.04},
)


@quantplug.hookimpl
def register_backends(register):
    quantizer = "quantplug_float.quantizer:"
    for name, config, cls, native, description in (
        (
            "fp8",
            Fp8Config,
            "Fp8Quantizer",
            True,
            "Transformers' fine-grained FP8: e4m3 weights, a float32 scale per 128x128 tile (or per tensor); MoE experts kept stacked",
        ),
        (
            "mxfp8",
            Mxfp8Config,
            "Fp8Quantizer",
            True,
            "MXFP8: e4m3 weights, a power-of-two scale per 32 inputs",
        ),
        (
            "fbgemm_fp8",
            FbgemmFp8Config,
            "FbgemmQuantizer",
            False,
            "FBGEMM FP8: e4m3 weights, a float32 scale per output row",
        ),
    ):
        register(
            quantplug.Backend(
                name=name,
                config=config,
                quantizer=quantizer + cls,
                capabilities=quantplug.Capabilities(**_CAPS, native_experts=native),
                requires=(),  # plain PyTorch
                presets=PRESETS[name],
                description=description + "; pure PyTorch, dequantized per layer on CPU",
                transformers_format=True,
            )
        )
    register(
        quantplug.Backend(
            name="mxfp4",
            config=Mxfp4Config,
            quantizer="quantplug_float.mxfp4:Mxfp4Quantizer",
            capabilities=quantplug.Capabilities(
                bits=(4,),
                devices=("cpu", "cuda", "mps"),
                needs_calibration=False,
                trainable=False,
                serializable=True,
                weight_dtypes=("e2m1",),
                native_experts=True,
                max_rel_error={4: 0.15},
            ),
            requires=(),  # plain PyTorch
            presets=PRESETS["mxfp4"],
            description="MXFP4, gpt-oss's experts format: e2m1 values with a power-of-two scale per 32 inputs; "
            "gpt-oss only, its Linear layers stay in full precision; pure PyTorch, dequantized per routed expert",
            transformers_format=True,
        )
    )
