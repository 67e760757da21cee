"""``BitNetQuantizer``: quantize, load and save BitNet layers in Transformers' exact checkpoint
layout (``weight`` uint8 [out / 4, in] + ``weight_scale`` [1], or the full-precision ``weight`` in
online mode; ``bias`` and ``rms_norm.weight`` as Transformers names them)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import quantplug

from . import packing
from .config import BitNetConfig
from .modules import BitNetLinear, OnlineBitLinear

TERNARY_WARNING = (
    "quantplug-bitnet: ternarizing weights (-1, 0, +1 times one scale per layer) keeps the accuracy "
    "only of models trained for it (BitNet b1.58); an ordinary model loses it (SmolLM2-135M-Instruct: "
    "perplexity {ppl}, bench/RESULTS.md 'bitnet'). Load a BitNet checkpoint instead, or quantize with "
    "quantization_mode='online' to train the model for it first."
)
PERPLEXITY_FIGURE = "14.2 -> 1.7e+08 in bfloat16"


class BitNetQuantizer(quantplug.Quantizer):
    config: BitNetConfig

    def __init__(self, backend, config):
        super().__init__(backend, config)
        self._warned = False

    # -- building ---------------------------------------------------------------------------

    def _eps(self) -> float | None:
        return self.config.eps if self.config.use_rms_norm else None

    def _online(self, module: nn.Linear, device) -> OnlineBitLinear:
        return OnlineBitLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            dtype=module.weight.dtype,
            device=device,
            rms_norm_eps=self._eps(),
        )

    def _offline(self, module: nn.Linear, device) -> BitNetLinear:
        return BitNetLinear(
            module.in_features,
            module.out_features,
            linear_class=self.config.linear_class,
            bias=module.bias is not None,
            dtype=module.weight.dtype,
            device=device,
            rms_norm_eps=self._eps(),
        )

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        out_f = getattr(module, "out_features", 0)
        if not self.config.online and out_f % packing.ROWS_PER_BYTE:
            return (
                f"out_features={out_f} is not a multiple of 4: BitNet's checkpoint packs 4 output rows "
                "per byte (Transformers' BitLinear cannot hold this layer)"
            )
        return None

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return self._online(module, "meta") if self.config.online else self._offline(module, "meta")

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        device = module.weight.device
        if self.config.online:  # the weights stay; every forward ternarizes them
            q = self._online(module, device)
            q.weight.data.copy_(module.weight.detach())
            if module.bias is not None:
                q.bias.data.copy_(module.bias.detach())
            return q
        if not self._warned:
            self._warned = True
            warnings.warn(TERNARY_WARNING.format(ppl=PERPLEXITY_FIGURE), stacklevel=2)
        q = self._offline(module, device)
        codes, scale = packing.ternarize(module.weight)
        # bitlinear divides the output by weight_scale (1 / mean|W|), autobitlinear multiplies it (mean|W|)
        q.weight_scale.fill_(float(scale) if self.config.linear_class == "bitlinear" else float(1.0 / scale))
        if module.bias is not None:
            q.bias.copy_(module.bias.detach())
        q.set_codes(codes, module.weight.dtype)
        return q

    # -- the checkpoint ---------------------------------------------------------------------

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        if isinstance(qmodule, OnlineBitLinear):
            return {k: v.detach() for k, v in qmodule.state_dict().items()}
        out = {"weight": packing.pack(qmodule.ternary_codes()), "weight_scale": qmodule.weight_scale}
        if qmodule.bias is not None:
            out["bias"] = qmodule.bias
        if qmodule.rms_norm is not None:
            out["rms_norm.weight"] = qmodule.rms_norm.weight.detach()
        return out

    def expected_tensors(self, name: str, module: nn.Linear):
        if self.config.online:
            return {
                k: (tuple(t.shape), t.dtype) for k, t in self.empty_module(name, module).state_dict().items()
            }
        spec = {"weight": (None, None), "weight_scale": ((1,), None)}  # checked by load_module
        if module.bias is not None:
            spec["bias"] = ((module.out_features,), None)
        if self.config.use_rms_norm:
            spec["rms_norm.weight"] = ((module.in_features,), None)
        return spec

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        dtype = module.weight.dtype
        if self.config.online:
            q = self._online(module, "meta")
            q.load_state_dict(tensors, strict=True, assign=True)
            return q
        for key, t in tensors.items():
            if key != "weight" and not t.dtype.is_floating_point:
                raise quantplug.CheckpointError(
                    f"tensor {name + '.' + key!r} has dtype {t.dtype}; BitNet stores it as a float"
                )
        codes = self._codes(name, module, tensors["weight"])
        device = codes.device
        q = self._offline(module, device)
        q.weight_scale.copy_(tensors["weight_scale"])
        if module.bias is not None:
            q.bias.copy_(tensors["bias"])
        if q.rms_norm is not None:
            q.rms_norm.weight.data.copy_(tensors["rms_norm.weight"])
        q.set_codes(codes, dtype)
        return q

    def _codes(self, name: str, module: nn.Linear, weight: torch.Tensor) -> torch.Tensor:
        """The int8 codes of a stored ``weight``: packed (uint8 [out / 4, in]), or, for
        autobitlinear, unpacked ternary floats [out, in] (what Transformers' save_pretrained of a
        loaded AutoBitLinear model writes)."""
        out_f, in_f = module.out_features, module.in_features
        where = f"tensor {name + '.weight'!r}"
        if weight.dtype == torch.uint8:
            if tuple(weight.shape) != (out_f // packing.ROWS_PER_BYTE, in_f) or out_f % packing.ROWS_PER_BYTE:
                raise quantplug.CheckpointError(
                    f"{where} has shape {list(weight.shape)}; a packed BitNet weight of a [{out_f}, {in_f}] "
                    f"layer is uint8 [{out_f // packing.ROWS_PER_BYTE}, {in_f}] (4 rows per byte)"
                )
            if bool(((weight & (weight >> 1)) & 0x55).any()):  # a 2-bit field holding 3
                raise quantplug.CheckpointError(
                    f"{where} holds the 2-bit value 3 (weight +2), which is not ternary: not a BitNet checkpoint"
                )
            return packing.unpack(weight)
        if weight.dtype.is_floating_point and self.config.linear_class == "autobitlinear":
            if tuple(weight.shape) != (out_f, in_f):
                raise quantplug.CheckpointError(
                    f"{where} has shape {list(weight.shape)}; an unpacked AutoBitLinear weight is [{out_f}, {in_f}]"
                )
            bad = (weight != weight.round()) | (weight.abs() > 1)
            if bool(bad.any()):
                raise quantplug.CheckpointError(
                    f"{where} is a float tensor that is not ternary ({int(bad.sum())} values outside -1, 0, 1): "
                    "an offline AutoBitLinear checkpoint stores ternary codes (packed uint8, or unpacked -1 / 0 / 1); "
                    "full-precision weights belong to quantization_mode='online'"
                )
            return weight.to(torch.int8)
        allowed = "uint8 [out / 4, in]" + (
            " or ternary floats [out, in]" if self.config.linear_class == "autobitlinear" else ""
        )
        raise quantplug.CheckpointError(
            f"{where} has dtype {weight.dtype}; a {self.config.linear_class} checkpoint stores {allowed}"
        )

    def integer_grid(self, name: str, qmodule: nn.Module):
        if isinstance(qmodule, OnlineBitLinear):
            return "online BitNet: full-precision weights, ternarized on every forward"
        where = qmodule.kernel if qmodule is not None and qmodule.kernel else "a plain matmul"
        return f"ternary weights with int8 activations: quantplug-bitnet's own layer runs them on {where}"
