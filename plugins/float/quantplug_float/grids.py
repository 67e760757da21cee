"""``float8_grid``: an ``Fp8Linear`` as a ``quantplug.Float8Grid`` (``quantplug.export``), or why not.

The codes and the scales go over as they are (e8m0 block scales, powers of two, become the float32
values they stand for, exactly); what a float8 export target has no scheme for is refused by name:
MXFP8's e8m0 scales per 32 inputs, and static activation scales (``activation_scheme: "static"``).
"""

from __future__ import annotations

import torch
from torch import nn

import quantplug

from . import codec
from .fp8 import Fp8Linear

#: MXFP8's tile: one e8m0 scale per 32 inputs of a row
MX_BLOCK = (1, 32)


def float8_grid(qmodule: nn.Module) -> quantplug.Float8Grid | str:
    if not isinstance(qmodule, Fp8Linear):
        return f"{type(qmodule).__name__} is not a quantplug-float Fp8Linear"
    scale = qmodule.scale
    pow2 = scale.dtype in (torch.uint8, getattr(torch, "float8_e8m0fnu", None))
    if pow2 and tuple(qmodule.block) == MX_BLOCK:
        return (
            "its weights are MXFP8 (e4m3 with an e8m0 scale per 32 inputs), which has no float8 export scheme "
            "(export holds fp8 block-wise, fp8 per-tensor and fbgemm_fp8 per-row scales)"
        )
    if qmodule.activation_scale is not None:
        return (
            "it has a calibrated activation_scale (activation_scheme 'static'), which the float8 export schemes "
            "(dynamic activations) would drop; export an fp8 model with activation_scheme 'dynamic'"
        )
    block = None if qmodule.per_tensor else tuple(qmodule.block)
    scale = codec.scales_as_float(scale).reshape(1, 1) if block is None else codec.scales_as_float(scale)
    bias = None if qmodule.bias is None else qmodule.bias.detach()
    return quantplug.Float8Grid(qmodule.weight, scale.contiguous(), block, bias)
