"""``AwqQuantizer``: AWQ ``gemm`` checkpoints through GPTQModel's torch AWQ kernel (any device).

Quantizing with AWQ is refused by name (GPTQModel's AWQ quantizer needs CUDA and is not wired in);
``load_module`` rebuilds each layer from the checkpoint, ``module_tensors`` gives the tensors back
exactly as they were read, so a re-save writes the same files.
"""

from __future__ import annotations

import torch
from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
from torch import nn

import quantplug

from .grids import awq_grid, awq_tensors


class AwqLinear(AwqTorchLinear):
    """GPTQModel's ``AwqTorchLinear`` whose stored tensors never change: it converts scales and bias
    to the compute dtype on every forward (AwqTorchLinear converts its own buffers in place, so a
    model saved after running would hold other scales than the checkpoint's)."""

    def _ensure_runtime_dtype(self, *, device: torch.device, dtype: torch.dtype) -> None:
        self._runtime = (
            self.scales.to(device=device, dtype=dtype).contiguous(),
            None if self.bias is None else self.bias.to(device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = self.scales, self.bias
        compute = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
        self._ensure_runtime_dtype(device=x.device, dtype=compute)
        try:
            self._buffers["scales"], self._buffers["bias"] = self._runtime
            return super().forward(x)
        finally:
            self._buffers["scales"], self._buffers["bias"] = stored


for _key in [k for k in vars(AwqTorchLinear) if k.startswith("SUPPORTS_")]:
    setattr(AwqLinear, _key, getattr(AwqTorchLinear, _key))
# ...but it is quantplug's layer, not a kernel of GPTQModel's own: its kernel selection (which
# Transformers' GPTQ / AWQ loading uses in the same process) must never pick it, or two kernels
# would match one backend
AwqLinear.SUPPORTS_BACKEND_SELECTION = False


class AwqQuantizer(quantplug.Quantizer):
    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        device = module.weight.device.type
        raise quantplug.BackendUnavailableError(
            f"quantplug-gptqmodel does not quantize with AWQ on {device!r}: GPTQModel's AWQ quantizer needs "
            f"CUDA{' (this is a CPU)' if device == 'cpu' else ''}, and it is not wired into this plugin. "
            f"AWQ checkpoints load on every device (quantplug.load(folder)); to quantize here, use "
            f"{{'quant_method': 'gptq'}} (calibrated 4-bit) or another backend (`quantplug select`)."
        )

    def needs_calibration(self) -> bool:
        return False  # never reached for quantizing (refused above); loading needs no data

    def _layer(self, module: nn.Linear, meta: bool) -> AwqLinear:
        cfg = self.config
        with torch.device("meta") if meta else torch.device("cpu"):
            return AwqLinear(
                bits=cfg.bits,
                group_size=cfg.group_size,
                sym=not cfg.zero_point,
                desc_act=False,
                in_features=module.in_features,
                out_features=module.out_features,
                bias=module.bias is not None,
                register_buffers=True,
            )

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return self._layer(module, meta=True)

    def expected_tensors(self, name: str, module: nn.Linear):
        out = {k: (tuple(t.shape), t.dtype) for k, t in self.empty_module(name, module).state_dict().items()}
        out["scales"] = (out["scales"][0], None)  # float16 or bfloat16, as written
        if "bias" in out:
            out["bias"] = (out["bias"][0], None)
        return out

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        for key in ("scales", "bias"):
            t = tensors.get(key)
            if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise quantplug.CheckpointError(
                    f"{name}.{key}: stored as {t.dtype}, expected a float dtype: the checkpoint is damaged"
                )
        layer = self._layer(module, meta=False)
        layer.load_state_dict(tensors, strict=True, assign=True)
        return layer

    def integer_grid(self, name: str, qmodule: nn.Module):
        """AWQ's 4-bit codes and integer zero points (``weight = (q - z) * s``) shifted to signed integers."""
        if not isinstance(qmodule, AwqLinear):
            return f"{type(qmodule).__name__} is not an AWQ layer of this plugin"
        return awq_grid(qmodule)

    def encode_grid(self, name: str, module: nn.Linear, grid) -> nn.Module:
        """An ``AwqLinear`` holding exactly ``grid``, as ``load_module`` builds it from a checkpoint."""
        return self.load_module(name, module, awq_tensors(name, module, grid, self.config))
