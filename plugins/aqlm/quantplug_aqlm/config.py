"""``AqlmConfig``: Transformers' ``AqlmConfig`` keys, validated without importing torch."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import quantplug

MAX_NBITS = 16
"""aqlm stores codes of up to 8 bits as int8 and up to 16 as int16; every published checkpoint uses 8
(Kx8) or 16 (1x16). More bits means a codebook of over 65536 vectors per codebook."""


def module_of(parameter: str) -> str:
    """The module a ``linear_weights_not_to_quantize`` entry names: Transformers' AQLM config lists
    parameters (``"lm_head.weight"``), quantplug's skip lists modules (``"lm_head"``). An entry that
    does not end in ``.weight`` is taken as a module name already."""
    return parameter[: -len(".weight")] if parameter.endswith(".weight") else parameter


@dataclasses.dataclass(frozen=True)
class AqlmConfig(quantplug.QuantConfig):
    """AQLM (Additive Quantization of Language Models, Egiazarian et al. 2024), as Transformers'
    ``AqlmConfig`` writes it in ``config.json``.

    Each group of ``out_group_size`` x ``in_group_size`` weights is the sum of ``num_codebooks``
    vectors, one picked from each codebook of ``2 ** nbits_per_codebook`` learned vectors, times one
    scale per output group: ``num_codebooks * nbits_per_codebook / (in_group_size * out_group_size)``
    bits per weight (1x16 with groups of 8: 2 bits; 2x8: 2 bits; 4x8: 4 bits).

    ``linear_weights_not_to_quantize`` lists PARAMETER names (``"lm_head.weight"``,
    ``"model.embed_tokens.weight"``), as AQLM's converter writes them. Their modules
    (``linear_modules_not_to_quantize``, derived, never written) stay in full precision: that list is
    what quantplug's matcher reads (``skip_aliases``), so ``lm_head.weight`` keeps ``lm_head`` dense.
    Transformers 5.25 passes the parameter names to its module-name matcher instead, where
    ``"lm_head.weight"`` matches no module.
    """

    quant_method = "aqlm"
    skip_aliases: ClassVar[tuple[str, ...]] = ("linear_modules_not_to_quantize",)
    skip_rules: ClassVar[tuple[str, ...]] = ("components",)

    in_group_size: int = 8
    out_group_size: int = 1
    num_codebooks: int = 1
    nbits_per_codebook: int = 16
    linear_weights_not_to_quantize: tuple[str, ...] | None = None
    linear_modules_not_to_quantize: tuple[str, ...] = dataclasses.field(init=False, default=(), compare=False)

    def validate(self) -> None:
        for field in ("in_group_size", "out_group_size", "num_codebooks"):
            if getattr(self, field) < 1:
                raise self.invalid(field, "a positive integer")
        if not 1 <= self.nbits_per_codebook <= MAX_NBITS:
            raise self.invalid(
                "nbits_per_codebook",
                f"an integer from 1 to {MAX_NBITS} (8 for Kx8 checkpoints, 16 for 1x16)",
                why="aqlm stores codes as int8 up to 8 bits and int16 up to 16",
            )
        names = self.linear_weights_not_to_quantize or ()
        if any(not name or name != name.strip() for name in names):
            raise self.invalid(
                "linear_weights_not_to_quantize",
                "a list of parameter names such as 'lm_head.weight' (non-empty, no surrounding spaces)",
            )
        object.__setattr__(self, "linear_modules_not_to_quantize", tuple(module_of(n) for n in names))

    @property
    def bits_per_weight(self) -> float:
        """Bits of codes per weight (codebooks and scales not counted)."""
        return self.num_codebooks * self.nbits_per_codebook / (self.in_group_size * self.out_group_size)

    @property
    def scheme(self) -> str:
        """AQLM's name for the codebook layout: ``"1x16"``, ``"2x8"``, ..."""
        return f"{self.num_codebooks}x{self.nbits_per_codebook}"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("linear_modules_not_to_quantize")  # derived from linear_weights_not_to_quantize
        return out
