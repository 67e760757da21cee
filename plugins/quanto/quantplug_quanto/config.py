"""``QuantoConfig``: optimum-quanto settings, with Transformers' ``QuantoConfig`` keys. Light: no torch."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import quantplug

#: weight bits -> the ``weights`` value ``for_bits`` picks
_WEIGHTS_FOR_BITS = {8: "int8", 4: "int4", 2: "int2"}


@dataclasses.dataclass(frozen=True)
class QuantoConfig(quantplug.QuantConfig):
    """optimum-quanto quantization (keys as in Transformers' ``QuantoConfig``).

    weights      "int8", "int4", "int2" (packed, groups of up to 128 along the input dimension,
                 scale and shift per group) or "float8" (float8_e4m3fn, scale per output channel)
    activations  None (weight-only) or "int8" / "float8": static per-tensor scales of each layer's
                 input and output, fitted by ``quantplug.quantize(..., calibration_data=...)``.
                 "none" is accepted as None (optimum-quanto's own spelling).
    """

    quant_method = "quanto"

    weights: Literal["int8", "int4", "int2", "float8"] = "int8"
    activations: Literal["int8", "float8", "none"] | None = None

    def validate(self) -> None:
        if self.activations == "none":
            object.__setattr__(self, "activations", None)

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> QuantoConfig:
        """int8 / int4 / int2 weights, weight-only (activation quantization needs calibration data)."""
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _WEIGHTS_FOR_BITS:
            raise quantplug.ConfigError(
                f"QuantoConfig stores weights at 8, 4 or 2 bits, not {bits}",
                field="bits",
                value=bits,
                allowed=sorted(_WEIGHTS_FOR_BITS),
            )
        return cls(weights=_WEIGHTS_FOR_BITS[bits], **overrides)
