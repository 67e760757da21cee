"""Quantizers of the e4m3 formats: ``Fp8Quantizer`` (fp8 and mxfp8: Transformers' fine-grained
FP8) and ``FbgemmQuantizer`` (fbgemm_fp8: one scale per row). Pure PyTorch, any device."""

from __future__ import annotations

import torch
from torch import nn

import quantplug

from . import codec
from .config import TORCH_FLOAT8, Fp8Config
from .fp8 import Fp8Experts, Fp8Linear, carried_state


def check_torch() -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        raise quantplug.ConfigError(
            f"torch {torch.__version__} has no float8_e4m3fn dtype; the float8 formats need torch>={TORCH_FLOAT8}"
        )


class _E4m3Quantizer(quantplug.Quantizer):
    scale_name = "weight_scale_inv"

    def check_config(self) -> None:
        check_torch()

    def offload_refusal(self) -> str | None:
        return None  # a layer is its buffers

    def _block(self) -> tuple[int, int] | None:
        raise NotImplementedError

    def _pow2(self) -> bool:
        return False

    def _floor(self) -> float:
        return 0.0

    def _static(self) -> bool:
        return False

    def _store_scale(self, s: torch.Tensor) -> torch.Tensor:
        """Scales (float32) as this format stores them."""
        return codec.e8m0_bytes(s) if self._pow2() else s

    def _scale_dtype(self) -> torch.dtype:
        return torch.uint8 if self._pow2() else torch.float32

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return Fp8Linear(
            module.in_features,
            module.out_features,
            block=self._block(),
            scale_name=self.scale_name,
            scale_dtype=self._scale_dtype(),
            bias=module.bias is not None,
            dtype=module.weight.dtype,
            static=self._static(),
            device=module.weight.device,
        )

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        if self._static():
            raise quantplug.ConfigError(
                f"{name}: activation_scheme 'static' needs activation scales calibrated on data, which "
                f"quantplug-float does not do; quantize with activation_scheme 'dynamic' (on CPU both compute "
                f"weight-only), or with compressed-tensors' calibrated FP8 static scheme"
            )
        q = self.empty_module(name, module)
        w = module.weight.detach()
        block = q.block
        codes, s = codec.quantize_blocks(w, block, pow2=self._pow2(), floor=self._floor())
        q.weight.copy_(codes)
        q.scale.copy_(self._store_scale(s).reshape(q.scale.shape))
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        return q

    def expected_tensors(self, name, module):
        """Scales in any dtype a checkpoint writes them in (float32, bfloat16, e8m0 bytes); checked by ``load_module``."""
        spec = super().expected_tensors(name, module)
        shape, _ = spec[self.scale_name]
        spec[self.scale_name] = (None if shape == () else shape, None)  # per tensor: [] or [1]
        if "activation_scale" in spec:
            spec["activation_scale"] = (None, None)
        return spec

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        scale = tensors[self.scale_name]
        where = f"tensor {name + '.' + self.scale_name!r}"
        allowed = (
            (torch.uint8, getattr(torch, "float8_e8m0fnu", None))
            if self._pow2()
            else (torch.float32, torch.bfloat16, torch.float16)
        )
        if scale.dtype not in allowed:
            fmt = "e8m0 bytes (uint8) or float8_e8m0fnu" if self._pow2() else "float32, bfloat16 or float16"
            raise quantplug.CheckpointError(
                f"{where} has dtype {scale.dtype}; this config's scales are {fmt}"
            )
        q = self.empty_module(name, module)
        if q.per_tensor and scale.numel() != 1:
            raise quantplug.CheckpointError(
                f"{where} has shape {list(scale.shape)}; a per-tensor scale has one element"
            )
        tensors = dict(tensors)
        tensors[self.scale_name] = scale.reshape(q.scale.shape) if q.per_tensor else scale
        if "activation_scale" in tensors:
            tensors["activation_scale"] = tensors["activation_scale"].reshape(())
        setattr(q, self.scale_name, tensors[self.scale_name])  # its stored dtype
        q.load_state_dict(tensors, strict=True, assign=True)
        return q

    def float8_grid(self, name: str, qmodule: nn.Module):
        from .grids import float8_grid

        return float8_grid(qmodule)


class Fp8Quantizer(_E4m3Quantizer):
    """fp8 / mxfp8: ``weight`` + ``weight_scale_inv`` per tile; experts kept stacked (``Fp8Experts``)."""

    config: Fp8Config

    def _block(self):
        return self.config.block

    def _pow2(self) -> bool:
        return self.config.scale_fmt == "ue8m0"

    def _static(self) -> bool:
        return self.config.activation_scheme == "static"

    def stored_full_precision(self, name: str) -> str | None:
        return "Transformers' FP8 writer leaves a layer whose shape its tiles do not divide unquantized"

    def serves_experts(self, name: str, layout) -> bool:
        """Stacked (as Transformers' ``FP8Experts``) where its layout is gate and up concatenated,
        not transposed, without biases, routed top-k, with tiles (the rest: one Fp8Linear per expert)."""
        return (
            layout.is_concatenated
            and not layout.is_transposed
            and not layout.has_bias
            and layout.routing == "top_k"
            and self.config.block is not None
            and not self._static()
        )

    def _experts(self, module: nn.Module, layout, device) -> Fp8Experts:
        carried, gate_fn = carried_state(module)
        return Fp8Experts(layout, self.config.block, self._scale_dtype(), carried, gate_fn, device=device)

    def empty_experts(self, name, module, layout):
        return self._experts(module, layout, "meta")

    def quantize_experts(self, name, module, layout):
        device = module.down_proj.device
        q = self._experts(module, layout, device)
        for param in (layout.up_param, "down_proj"):
            stacked = module._parameters[param].detach()
            parts = (
                [stacked[:, : layout.intermediate], stacked[:, layout.intermediate :]]
                if param == "gate_up_proj"
                else [stacked]
            )
            codes, scales = [], []
            for part in parts:  # gate and up tiled apart, as per-expert checkpoints store them
                c, s = codec.quantize_blocks(part, self.config.block, pow2=self._pow2())
                codes.append(c)
                scales.append(self._store_scale(s))
            getattr(q, param).copy_(torch.cat(codes, dim=1))
            getattr(q, param + "_scale_inv").copy_(torch.cat(scales, dim=1))
        return q

    def expected_experts_tensors(self, name, module, layout):
        spec = super().expected_experts_tensors(name, module, layout)
        return {
            k: (shape, None) if k.endswith("_scale_inv") else (shape, dtype)
            for k, (shape, dtype) in spec.items()
        }

    def load_experts(self, name, module, layout, tensors):
        q = self.empty_experts(name, module, layout)
        for key, t in tensors.items():
            if key.endswith("_scale_inv") and t.dtype not in (
                torch.float32,
                torch.bfloat16,
                torch.uint8,
                getattr(torch, "float8_e8m0fnu", None),
            ):
                raise quantplug.CheckpointError(
                    f"tensor {name + '.' + key!r} has dtype {t.dtype}; block scales are float32, bfloat16 or e8m0"
                )
        q.load_state_dict(tensors, strict=True, assign=True)
        return q


class FbgemmQuantizer(_E4m3Quantizer):
    """fbgemm_fp8: ``weight`` + ``weight_scale`` [out, 1] (row max / 448, FBGEMM's floor on tiny rows)."""

    scale_name = "weight_scale"

    def _block(self):
        return None  # replaced per layer by (1, in_features)

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return Fp8Linear(
            module.in_features,
            module.out_features,
            block=(1, module.in_features),
            scale_name=self.scale_name,
            bias=module.bias is not None,
            dtype=module.weight.dtype,
            device=module.weight.device,
        )

    def _floor(self) -> float:
        return 1.0 / (codec.E4M3_MAX * 512)  # FBGEMM's fp8_row_quantize: forward scale <= 448 * 512
