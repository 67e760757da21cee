"""``BitNetConfig``: Transformers' ``BitNetQuantConfig`` keys, validated without importing torch."""

from __future__ import annotations

import dataclasses
from typing import Literal

import quantplug


@dataclasses.dataclass(frozen=True)
class BitNetConfig(quantplug.QuantConfig):
    """BitNet b1.58: every weight in {-1, 0, +1} times one scale per layer (its mean absolute value),
    activations rounded to int8 per token on every forward.

    - ``linear_class="bitlinear"`` (Transformers' ``BitLinear``): 4 ternary rows packed per byte,
      ``weight_scale`` = 1 / mean|W| (the output is divided by it).
    - ``linear_class="autobitlinear"`` (``AutoBitLinear``, microsoft/bitnet-b1.58-2B-4T):
      ``quantization_mode="offline"`` stores the same packed codes with ``weight_scale`` = mean|W|
      (the output is multiplied by it); ``"online"`` keeps the full-precision weights and ternarizes
      them on every forward (quantization-aware training: gradients reach the weights).
    - ``use_rms_norm``: an RMSNorm (weight per input, ``rms_norm_eps``) on each layer's input first.
    """

    quant_method = "bitnet"
    skip_rules = ("transformers",)  # Transformers' should_convert_module rule for modules_to_not_convert

    linear_class: Literal["bitlinear", "autobitlinear"] = "bitlinear"
    quantization_mode: Literal["offline", "online"] = "offline"
    use_rms_norm: bool = False
    rms_norm_eps: float | None = 1e-6

    def validate(self) -> None:
        if self.linear_class == "bitlinear" and self.quantization_mode == "online":
            raise self.invalid(
                "quantization_mode",
                "'offline' with linear_class 'bitlinear' (only 'autobitlinear' quantizes online)",
            )
        if self.use_rms_norm and not (self.rms_norm_eps is not None and self.rms_norm_eps > 0):
            raise self.invalid("rms_norm_eps", "a positive number when use_rms_norm is true")

    @property
    def online(self) -> bool:
        return self.quantization_mode == "online" and self.linear_class == "autobitlinear"

    @property
    def eps(self) -> float:
        return 1e-6 if self.rms_norm_eps is None else float(self.rms_norm_eps)
