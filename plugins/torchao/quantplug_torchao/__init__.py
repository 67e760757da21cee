"""quantplug-torchao: torchao's quantization (int8, int4, intx, float8) behind quantplug's API.

This module is what the ``quantplug`` entry point names. It only registers a descriptor: torch and
torchao are imported when the quantizer (``quantplug_torchao.quantizer``) is first used. Importing
it quiets torchao's import (``quiet_torchao_import``), which Transformers triggers whenever it loads
a model, so every quantplug process that loaded its plugins prints no torchao noise.
"""

from __future__ import annotations

import logging
import os

import quantplug

from .config import MODE_DEVICES, MODE_REQUIREMENTS, MODES, TorchaoConfig

__all__ = [
    "PRESETS",
    "quiet_torchao_import",
    "MODES",
    "MODE_DEVICES",
    "MODE_REQUIREMENTS",
    "TorchaoConfig",
    "register_backends",
]


# rel_error / bits_per_weight: one Linear(2048, 2048) with Gaussian weights and inputs through
# quantplug on CPU (CUDA-only modes: the H200 figures). bits_per_weight rechecked (issue 20) on a
# float32 Linear(2048, 2048) through TorchaoQuantizer.quantize_module, as the bytes of every inner
# tensor of the weight (__tensor_flatten__: qdata, scale, zero_point) x 8 / weights: int8 8.0195,
# float8-weight-only 8.0156, intx4-g32 9.25 (one int8 byte per code + float32 scale and int8 zero
# per 32; 8.75 on a bf16 model). int4-weight-only (CUDA only, not measured): 4 + a bf16 scale and
# zero per 128, from torchao's Int4TilePackedTo4dTensor. Speeds vs the unquantized model: cuda from
# an H200 (bench/results/gpu.json: 4 Llama-7B-sized blocks through quantplug, bf16, decode in a
# CUDA graph); cpu from 4 x Linear(2048, 2048) at batch 8 vs fp32 (shared/BACKENDS.md).
PRESETS = (
    quantplug.Preset(
        "int8-weight-only",
        TorchaoConfig.from_mode("int8_weight_only"),
        trainable=True,  # LoRA through PEFT: tests/test_lora.py
        bits=8,
        bits_per_weight=8.02,
        rel_error=0.008,
        speed={"cuda": {"decode": 0.21, "prefill": 0.68}, "cpu": {"decode": 0.74}},
        note="5x slower than bf16 at decode on an H200 without torch.compile",
    ),
    quantplug.Preset(
        "int8-dynamic",
        TorchaoConfig.from_mode("int8_dynamic_activation_int8_weight"),
        bits=8,
        bits_per_weight=8.02,
        rel_error=0.012,
        speed={"cpu": {"decode": 0.25}},
        note="int8 activations quantized per token at run time",
    ),
    quantplug.Preset(
        "float8-dynamic",
        TorchaoConfig.from_mode("float8_dynamic_activation_float8_weight", float8_granularity="row"),
        bits=8,
        # 8.0156 measured (was 8.06): float8 codes + a float32 scale per row, on a bf16 Linear(2048,
        # 2048) (per-row needs bf16) quantized on CPU with torchao's hardware check patched out
        # (the check guards the matmul; Float8Tensor.from_hp builds the same tensors on any device).
        bits_per_weight=8.02,
        rel_error=0.037,
        devices=("cuda",),
        min_cuda_capability=(8, 9),
        speed={"cuda": {"decode": 0.60, "prefill": 0.45}},
        note="per-row scales (per-tensor failed on an H200: 'input_tensor must be 1x128 scaled')",
    ),
    quantplug.Preset(
        "float8-weight-only",
        TorchaoConfig.from_mode("float8_weight_only"),
        trainable=True,  # LoRA through PEFT: tests/test_lora.py
        bits=8,
        bits_per_weight=8.02,
        rel_error=0.026,
        speed={"cpu": {"decode": 0.2}},
    ),
    quantplug.Preset(
        "int4-weight-only",
        TorchaoConfig.from_mode("int4_weight_only", group_size=128),
        bits=4,
        bits_per_weight=4.25,
        rel_error=0.101,
        devices=("cuda",),
        speed={"cuda": {"decode": 1.49, "prefill": 0.047}},
        note="the fastest at decode on an H200 (1.5x bf16), 21x slower than bf16 at prefill",
    ),
    quantplug.Preset(
        "intx4-g32",
        TorchaoConfig.from_mode("intx_weight_only", bits=4, group_size=32),
        trainable=True,  # LoRA through PEFT: tests/test_lora.py
        bits=4,
        bits_per_weight=9.25,
        rel_error=0.093,
        speed={"cpu": {"decode": 0.33}},
        note="stored one value per byte: no smaller than int8",
    ),
)


class _KnownImportNoise(logging.Filter):
    """Two log lines of torchao's import that nobody can act on: that it skipped its C++ extensions
    because TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 (which this package or the user set to skip them),
    and torch's deprecation notice for the enums torchao registers with register_constant()."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (
            msg.startswith("Skipping import of cpp extensions due to TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1")
            or ("Calling register_constant() on Enum subclasses is deprecated" in msg and "Enum" in msg)
        )


_NOISE = _KnownImportNoise()


def quiet_torchao_import() -> None:
    """Filter torchao's two known import lines (``_KnownImportNoise``; every other torchao log line
    still shows) and, on a machine without an NVIDIA driver, set TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
    unless the user set it: the published torchao wheel's C++ extensions are CUDA builds that cannot
    load there (two "Failed to load ... .so" lines otherwise) and no CPU mode uses them. Idempotent;
    imports nothing."""
    if "TORCHAO_FORCE_SKIP_LOADING_SO_FILES" not in os.environ and not os.path.exists("/dev/nvidiactl"):
        os.environ["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(_NOISE)  # a no-op when already there


quiet_torchao_import()

#: this module runs in every process that loads quantplug's plugins (not read from the descriptor
#: cache), so Transformers' import of torchao is quiet there too; it imports neither torch nor torchao
QUANTPLUG_CACHE_DESCRIPTORS = False


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="torchao",
            transformers_format=True,  # Transformers' torchao checkpoints, both ways
            config=TorchaoConfig,
            quantizer="quantplug_torchao.quantizer:TorchaoQuantizer",
            capabilities=quantplug.Capabilities(
                # 8: int8 weight-only / dynamic, float8; 4: int4 (CUDA) and intx; 2-7: intx.
                bits=(2, 3, 4, 5, 6, 7, 8),
                # The union over modes. Per mode: int4_weight_only and float8 dynamic need CUDA
                # (float8 dynamic: compute capability >= 8.9); the others run on cpu and cuda.
                # TorchaoQuantizer.validate_environment enforces the per-mode rules.
                devices=("cpu", "cuda"),
                needs_calibration=False,
                trainable=False,
                serializable=True,
                # intx is stored unpacked, one value per int8 byte (torchao's UNPACKED_TO_INT8).
                weight_dtypes=("int8", "int4", "intx", "float8_e4m3fn"),
                activation_dtypes=("int8", "float8_e4m3fn"),
                max_rel_error={8: 0.04, 7: 0.025, 6: 0.045, 5: 0.09, 4: 0.16, 3: 0.35, 2: 0.75},
            ),
            requires=("torchao>=0.18,<0.19",),
            presets=PRESETS,
            description=(
                "torchao quantize_: int8 weight-only / dynamic-activation, int4 (CUDA), intx 2-8 bit "
                "group-wise, float8 weight-only / dynamic (CUDA cc>=8.9); Transformers TorchAoConfig checkpoints."
            ),
            notes=(
                "Per mode: int4_weight_only needs CUDA (or mslk); float8 dynamic needs CUDA cc>=8.9; intx is "
                "stored one value per byte. torchao's API churns: only 0.18 is supported."
            ),
        )
    )
