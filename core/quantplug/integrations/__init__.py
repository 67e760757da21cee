"""Bridges to other libraries. ``transformers``: quantplug backends inside ``from_pretrained``."""

from __future__ import annotations

import sys


def register_if_transformers_loaded() -> None:
    """Register quantplug's backends with Transformers when Transformers' quantizer registry is
    already imported (then ``from_pretrained`` can load what quantplug quantized or loaded; it costs
    microseconds). Called explicitly at the end of ``quantplug.quantize`` and ``quantplug.load``;
    importing Transformers only for this would cost seconds, so nothing is done otherwise."""
    if "transformers.quantizers.auto" in sys.modules:
        from .transformers import register_with_transformers

        register_with_transformers()
