"""The quantized layer: GPTQModel's torch kernel (``TorchLinear``), holding GPTQ's packed tensors.

In memory the zero points are in GPTQModel's v2 layout (the zero itself, what its kernels read);
a "gptq" (v1) checkpoint stores them minus one, as AutoGPTQ did and Transformers, vLLM and every
GPTQ kernel still expect. ``checkpoint_tensors`` / ``from_checkpoint`` convert with GPTQModel's own
converters, so a v1 checkpoint round-trips bit for bit.
"""

from __future__ import annotations

import torch
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.utils.model import (
    convert_gptq_v1_to_v2_format_module,
    convert_gptq_v2_to_v1_format_module,
)

#: GPTQModel's packer (``pack_block``) needs input and output features to be multiples of this
PACK_MULTIPLE = 32


class GptqLinear(TorchLinear):
    """GPTQModel's ``TorchLinear`` (dequantize, then one matmul in the input's dtype; any device),
    without the ``torch.compile`` of its dequantization that GPTQModel turns on by default (minutes
    of compiling on a CPU, and no kernel it would speed up there). The bias keeps the float dtype of
    the layer it replaces (GPTQModel would make it float16)."""

    def __init__(self, config, in_features: int, out_features: int, bias: bool, bias_dtype: torch.dtype):
        super().__init__(
            bits=config.bits,
            group_size=config.group_size,
            sym=config.sym,
            desc_act=config.desc_act,
            in_features=in_features,
            out_features=out_features,
            bias=bias,
            pack_dtype=torch.int32,
        )
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        self.optimized = True  # skips TorchLinear.optimize (torch.compile) in post_init
        self.quantplug_format = config.format

    def finish(self) -> GptqLinear:
        """Build the unpacking buffers once the packed tensors are in place."""
        self.post_init()
        return self

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of this layer as its checkpoint format stores them (v1: zero points minus 1)."""
        out = {k: v for k, v in self.state_dict().items()}
        if self.quantplug_format == "gptq":
            out["qzeros"] = _converted_qzeros(self, convert_gptq_v2_to_v1_format_module)
        return out

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> GptqLinear:
        """Take a checkpoint's tensors (v1 or v2 as configured) and make the layer ready to run."""
        self.load_state_dict(tensors, strict=True, assign=True)
        if self.quantplug_format == "gptq":
            self.qzeros = _converted_qzeros(self, convert_gptq_v1_to_v2_format_module)
        self.qzero_format(format=2)
        return self.finish()

    def load_v2_tensors(self, tensors: dict[str, torch.Tensor]) -> GptqLinear:
        """Take tensors whose zero points are in v2 (what this layer holds in memory, whatever its format)."""
        self.load_state_dict(tensors, strict=True, assign=True)
        self.qzero_format(format=2)
        return self.finish()


class _Qcfg:
    """What GPTQModel's v2 -> v1 converter reads from a quantize config."""

    def __init__(self, bits: int):
        self.bits, self.pack_dtype = bits, torch.int32


def _converted_qzeros(layer: GptqLinear, convert) -> torch.Tensor:
    """``layer.qzeros`` converted by one of GPTQModel's in-place v1 <-> v2 converters, on a copy
    (the layer keeps its own)."""
    own, flag = layer.qzeros, layer.qzero_format()
    layer.qzeros = own.clone()
    try:
        if convert is convert_gptq_v1_to_v2_format_module:
            convert(layer, bits=layer.bits, pack_dtype=torch.int32)
        else:
            convert(layer, quantize_config=_Qcfg(layer.bits))
        return layer.qzeros
    finally:
        layer.qzeros = own
        layer.qzero_format(format=flag)


# GPTQModel checks that every kernel class declares its own SUPPORTS_* capabilities: GptqLinear's
# are TorchLinear's.
for _key in [k for k in vars(TorchLinear) if k.startswith("SUPPORTS_")]:
    setattr(GptqLinear, _key, getattr(TorchLinear, _key))
# ...but it is quantplug's layer, not a kernel of GPTQModel's own: its kernel selection (which
# Transformers' GPTQ / AWQ loading uses in the same process) must never pick it, or two kernels
# would match one backend
GptqLinear.SUPPORTS_BACKEND_SELECTION = False
