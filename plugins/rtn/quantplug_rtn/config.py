"""``RtnConfig``: round-to-nearest settings. Light: imports no torch."""

from __future__ import annotations

import dataclasses
from typing import Literal

import quantplug


@dataclasses.dataclass(frozen=True)
class RtnConfig(quantplug.QuantConfig):
    """Round-to-nearest weight quantization.

    bits        2, 4 or 8 bits per weight (packed: 4, 2 or 1 values per byte)
    group_size  weights sharing one scale along the input dimension; -1 = one group per output channel
    symmetric   True: scale only (codes centred on zero); False: scale and zero point per group
    """

    quant_method = "rtn"

    bits: Literal[2, 4, 8] = 4
    group_size: int = 128
    symmetric: bool = True

    def validate(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise self.invalid("group_size", "-1 (one group per output channel) or a positive integer")
