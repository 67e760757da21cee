"""Configs of the float formats, as Transformers writes them in ``config.json``. Light: no torch."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import quantplug

TORCH_FLOAT8 = "2.1"
"""The first torch with ``float8_e4m3fn``."""


@dataclasses.dataclass(frozen=True)
class Fp8Config(quantplug.QuantConfig):
    """Transformers' fine-grained FP8 (``FineGrainedFP8Config``, ``quant_method: "fp8"``): e4m3
    weights with a float32 scale (``weight_scale_inv``) per tile of ``weight_block_size``.

    weight_block_size  [rows, cols] of a tile sharing one scale; None: one scale per tensor
    activation_scheme  "dynamic" or "static" (a stored ``activation_scale`` per layer, kept and saved).
                       Either way quantplug computes weight-only on CPU (Transformers' CPU path too):
                       activations are not rounded to fp8
    scale_fmt          "float" (float32 scales) or "ue8m0" (powers of two, stored as e8m0 bytes)
    expert_dtype       "fp8" (DeepSeek-V4's "fp4" experts are not supported)
    dequantize         Transformers' load-time switch; quantplug always keeps the fp8 bytes
    ignored_layers     MiniMax's name for modules_to_not_convert
    modules_to_convert fp8 embeddings (Qwen4-Exp); not supported: must be empty
    """

    quant_method = "fp8"
    skip_aliases: ClassVar[tuple[str, ...]] = ("ignored_layers",)

    fmt: Literal["e4m3"] = "e4m3"
    activation_scheme: Literal["dynamic", "static"] = "dynamic"
    weight_block_size: tuple[int, int] | None = (128, 128)
    scale_fmt: Literal["float", "ue8m0"] = "float"
    expert_dtype: Literal["fp8", "fp4"] = "fp8"
    dequantize: bool = False
    modules_to_convert: tuple[str, ...] | None = None
    ignored_layers: tuple[str, ...] | None = None

    def validate(self) -> None:
        block = self.weight_block_size
        if block is not None and (len(block) != 2 or min(block) < 1):
            raise self.invalid(
                "weight_block_size", "[rows, cols] of positive integers, or null (one scale per tensor)"
            )
        if self.expert_dtype != "fp8":
            raise self.invalid(
                "expert_dtype",
                "'fp8'",
                why="DeepSeek-V4's FP4-packed experts (expert_dtype 'fp4') are not supported yet",
            )
        if self.modules_to_convert:
            raise self.invalid(
                "modules_to_convert",
                "empty or null",
                why="fp8 embedding tables (modules_to_convert) are not supported yet",
            )
        if self.scale_fmt == "ue8m0" and block is None:
            raise self.invalid(
                "scale_fmt", "'float' when weight_block_size is null", why="ue8m0 scales are per block"
            )

    @property
    def block(self) -> tuple[int, int] | None:
        return None if self.weight_block_size is None else tuple(self.weight_block_size)


@dataclasses.dataclass(frozen=True)
class Mxfp8Config(Fp8Config):
    """MXFP8 (``quant_method: "mxfp8"``, Transformers' fine-grained FP8 quantizer): e4m3 weights with
    a power-of-two (e8m0) scale per 32 inputs of a row."""

    quant_method = "mxfp8"

    weight_block_size: tuple[int, int] | None = (1, 32)
    scale_fmt: Literal["float", "ue8m0"] = "ue8m0"

    def validate(self) -> None:
        super().validate()
        if (
            self.scale_fmt != "ue8m0"
            or self.weight_block_size is None
            or tuple(self.weight_block_size) != (1, 32)
        ):
            raise self.invalid(
                "weight_block_size",
                "[1, 32] with scale_fmt 'ue8m0'",
                why="MXFP8 is e8m0 scales over 32 inputs; use quant_method 'fp8' for other tiles",
            )


@dataclasses.dataclass(frozen=True)
class FbgemmFp8Config(quantplug.QuantConfig):
    """FBGEMM FP8 (``FbgemmFp8Config``, ``quant_method: "fbgemm_fp8"``): e4m3 weights with one
    float32 scale per output row (``weight_scale`` [out, 1]).

    activation_scale_ub  the bound FBGEMM's GPU kernel puts on per-row activation scales; kept and
                         saved. On CPU quantplug computes weight-only (no activation rounding)
    """

    quant_method = "fbgemm_fp8"

    activation_scale_ub: float = 1200.0

    def validate(self) -> None:
        if not self.activation_scale_ub > 0:
            raise self.invalid("activation_scale_ub", "a positive number")


GPT_OSS_SKIPS = ("model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head")
"""What gpt-oss's own checkpoints (openai/gpt-oss-20b, -120b) list in ``modules_to_not_convert``:
everything but the experts, in Transformers' pattern syntax."""


@dataclasses.dataclass(frozen=True)
class Mxfp4Config(quantplug.QuantConfig):
    """MXFP4 (``quant_method: "mxfp4"``, Transformers' ``Mxfp4Config``): gpt-oss's MoE experts as
    e2m1 values (two per byte, ``*_blocks``) with an e8m0 scale per 32 inputs (``*_scales``).
    Only ``GptOssExperts`` is this format; every other layer stays in full precision.

    modules_to_not_convert  Transformers' patterns (regex prefix or suffix, ``*`` for the layer
                            number), by default the list gpt-oss's own checkpoints carry
    dequantize              Transformers' load-time switch (dequantize to bfloat16); accepted,
                            quantplug always keeps the packed bytes. Not written on save unless set
    """

    quant_method = "mxfp4"
    skip_rules: ClassVar[tuple[str, ...]] = ("components", "transformers")

    modules_to_not_convert: tuple[str, ...] | None = GPT_OSS_SKIPS
    dequantize: bool = False

    def to_dict(self) -> dict:
        out = super().to_dict()
        if not self.dequantize:
            out.pop("dequantize")  # as Transformers writes it: a load-time switch, not a format field
        return out
