"""``RtnQuantizer`` and ``RtnLinear``: round-to-nearest quantization with packed storage.

Storage of one ``RtnLinear`` (``out`` x ``in`` weight, ``g`` = group size, ``G`` = groups per row):
    qweight  uint8 [out, ceil(G*g*bits/8)]  codes 0..2**bits-1, packed low bits first
    scale    weight dtype [out, G]
    zero     uint8 [out, G]                 (asymmetric only) the code that dequantizes to 0
    bias     weight dtype [out]             (if the layer has one)
The input dimension is zero-padded up to a multiple of ``g``, so every layer shape works.
Dequantized weight = (code - zero) * scale, with zero = 2**(bits-1) when symmetric.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import quantplug

from .config import RtnConfig


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) along the last dim, 8/bits per byte, low bits first."""
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = F.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``n`` codes of each row."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


class RtnLinear(nn.Module):
    """A Linear layer whose weight is stored as packed round-to-nearest codes; dequantized on forward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.group_size = in_features if group_size == -1 else group_size
        groups = math.ceil(in_features / self.group_size)
        packed = math.ceil(groups * self.group_size * bits / 8)
        self.register_buffer("qweight", torch.empty(out_features, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=dtype, device=device))
        zero = None if symmetric else torch.empty(out_features, groups, dtype=torch.uint8, device=device)
        self.register_buffer("zero", zero)  # None (symmetric) is not part of the state dict
        bias_data = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if bias_data is None else nn.Parameter(bias_data, requires_grad=False)

    @classmethod
    def like(cls, linear: nn.Linear, config: RtnConfig) -> RtnLinear:
        """An uninitialized ``RtnLinear`` with ``linear``'s shape, bias, dtype and device (meta: meta)."""
        return cls(
            linear.in_features,
            linear.out_features,
            bits=config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: RtnConfig) -> RtnLinear:
        """Quantize ``linear``'s weight by round-to-nearest, per group of ``group_size`` inputs."""
        q = cls.like(linear, config)
        w = linear.weight.detach()
        out_f, in_f = w.shape
        g, levels = q.group_size, (1 << config.bits) - 1
        wg = F.pad(w.float(), (0, q.scale.shape[1] * g - in_f)).reshape(out_f, -1, g)
        if config.symmetric:  # codes 1..levels, centred on zero = 2**(bits-1)
            qmax = (1 << (config.bits - 1)) - 1
            scale = (wg.abs().amax(dim=-1) / qmax).clamp_min(1e-12).to(w.dtype)
            zero = torch.full_like(scale, qmax + 1, dtype=torch.float32)
            lowest = 1
        else:  # codes 0..levels; the range always includes 0, which ``zero`` encodes exactly
            wmin, wmax = wg.amin(dim=-1).clamp_max(0), wg.amax(dim=-1).clamp_min(0)
            scale = ((wmax - wmin) / levels).clamp_min(1e-12).to(w.dtype)
            zero = torch.round(-wmin / scale.float()).clamp(0, levels)
            lowest = 0
        codes = (torch.round(wg / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(lowest, levels)
        q.qweight.copy_(pack(codes.reshape(out_f, -1).to(torch.uint8), config.bits))
        q.scale.copy_(scale)
        if q.zero is not None:
            q.zero.copy_(zero.to(torch.uint8))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantize(self) -> torch.Tensor:
        """The full-precision weight [out, in] this layer computes with."""
        groups = self.scale.shape[1]
        codes = unpack(self.qweight, self.bits, groups * self.group_size).reshape(
            self.out_features, groups, -1
        )
        zero = (
            torch.full_like(self.scale, 1 << (self.bits - 1))
            if self.zero is None
            else self.zero.to(self.scale.dtype)
        )
        w = (codes.to(self.scale.dtype) - zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, {kind}"


class RtnQuantizer(quantplug.Quantizer):
    """The two methods every quantizer writes. The rest are ``quantplug.Quantizer``'s defaults:
    ``module_tensors`` stores ``state_dict()``, ``expected_tensors`` reads keys, shapes and dtypes
    off ``empty_module``, and ``load_module`` assigns the checkpoint tensors to ``empty_module``."""

    config: RtnConfig

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        return RtnLinear.from_linear(module, self.config)

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return RtnLinear.like(module, self.config)  # module is on the meta device: so is the result
