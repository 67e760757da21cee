"""BitNet layers. ``BitNetLinear`` (offline: ternary codes, one scale) runs its weights on the
integer kernel quantplug has for them on the device (``quantplug.choose_kernel``: torch's fused
int4 / int8 CPU kernels in bfloat16 / float16) with the activations rounded to int8 per token, as
Transformers' ``BitLinear`` / ``AutoBitLinear`` compute them; ``OnlineBitLinear`` keeps the
full-precision weights and ternarizes them on every forward, with straight-through gradients."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import quantplug

from . import packing

ACT_MAX = 127.0
_SHIFT = 1.0 / 128.0  # integer activations (|q| <= 128) times 2**-7: exact, and no float16 overflow
CHECK_TOLERANCE = 1e-2


class RMSNorm(nn.Module):
    """Transformers' ``LlamaRMSNorm``: what ``use_rms_norm`` puts on a BitNet layer's input."""

    def __init__(self, features: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features, dtype=dtype, device=device))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def _act_scale(t: torch.Tensor) -> torch.Tensor:
    """Per-token int8 scale of activations ``t`` [rows, in], in ``t``'s dtype: 127 / absmax (floored)."""
    return ACT_MAX / t.abs().amax(-1, keepdim=True).clamp(min=1e-5)


def _round(t: torch.Tensor) -> torch.Tensor:
    """``round``, with a straight-through gradient when one is needed (Transformers' ``ActQuant``)."""
    return t + (t.round() - t).detach() if t.requires_grad else t.round()


class BitNetLinear(nn.Module):
    """Offline BitNet: ``weight = T / weight_scale`` (bitlinear) or ``T * weight_scale``
    (autobitlinear), T in {-1, 0, 1}; int8 activations per token."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        linear_class: str,
        bias: bool,
        dtype: torch.dtype,
        device=None,
        rms_norm_eps: float | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear_class = linear_class
        # the codes as Transformers' BitLinear holds them (2 bits each), until a kernel takes them
        rows = -(-out_features // packing.ROWS_PER_BYTE)
        self.register_buffer("packed", torch.empty(rows, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.rms_norm = None if rms_norm_eps is None else RMSNorm(in_features, rms_norm_eps, dtype, device)
        self.weights: nn.Module | None = None  # the kernel's form of the codes, once set_codes() found one
        self.codes8: torch.Tensor | None = None  # int8 [out, in] for torch._int_mm, where it runs
        self.kernel: str | None = None
        self.kernel_problem = "no codes yet"
        self.dense_from: int | None = None

    def ternary_codes(self) -> torch.Tensor:
        """int8 [out, in]: the codes, whichever form holds them."""
        if self.codes8 is not None:
            return self.codes8
        return packing.unpack(self.packed) if self.weights is None else self.weights.codes()

    def set_codes(self, codes: torch.Tensor, dtype: torch.dtype, int_mm: bool = True) -> None:
        """Hold int8 ternary ``codes`` [out, in] for the fastest matmul ``dtype`` activations have on
        their device: in a bfloat16 / float16 model on a CPU, ``torch._int_mm`` (int8 activations
        times int8 codes, exact int32 sums; one byte per weight), else the int4 kernel quantplug has
        (half a byte), else packed 4 per byte and unpacked on every forward (as Transformers does).
        Each is checked on one input against the plain matmul: one that answers otherwise is not
        used, and a warning names it."""
        if codes.device.type == "meta":
            self.packed = packing.pack(codes)
            return
        problems = []
        if int_mm and codes.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            problem = _int_mm_problem(codes)
            if problem is None:
                self.codes8, self.kernel = codes.contiguous(), INT_MM
                self.packed, self.kernel_problem = None, ""
                return
            warnings.warn(f"quantplug-bitnet: {INT_MM} not used: {problem}", stacklevel=2)
            problems.append(f"{INT_MM}: {problem}")
        for bits in (4, 8):  # ternary codes sit on a 4-bit grid (half the bytes) or an 8-bit one
            layout = quantplug.GridLayout(bits, self.in_features, True, self.in_features, self.out_features)
            kernel, why = quantplug.choose_kernel(layout, codes.device.type, dtype)
            if kernel is None:
                problems.append(why)
                continue
            ones = torch.ones(self.out_features, 1, device=codes.device)
            weights = kernel.build(quantplug.IntegerGrid(codes, ones, None, bits, self.in_features), dtype)
            problem = _check(weights, codes, dtype)
            if problem is None:
                self.weights, self.kernel, self.dense_from = weights, kernel.name, kernel.dense_from
                self.packed = None
                self.kernel_problem = ""
                return
            warnings.warn(f"quantplug-bitnet: kernel {kernel.name!r} disabled: {problem}", stacklevel=2)
            problems.append(f"{kernel.name}: {problem}")
        self.kernel_problem = "; ".join(dict.fromkeys(problems))
        self.packed = packing.pack(codes)

    def _matmul(self, x: torch.Tensor, shift: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ T.T (+ bias)`` for ``x`` [rows, in]; ``shift``: ``x`` holds integers up to 128, taken
        times 2**-7 (exact) so that float16 sums do not overflow."""
        if shift:
            x = x * _SHIFT
        if x.requires_grad:  # fresh weights (kernels' dense scratch is reused by the next layer)
            w = self.ternary_codes().to(x.dtype)
        elif self.weights is None:
            w = packing.unpack(self.packed).to(x.dtype)
        elif self.dense_from is not None and x.shape[0] >= self.dense_from:
            w = self.weights.dequantize(x.dtype)
        else:
            y = self.weights.matmul(x.contiguous())
            y = y * 128 if shift else y
            return y if bias is None else y + bias
        return F.linear(x, w, bias) * 128 if shift else F.linear(x, w, bias)

    def _int_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``torch._int_mm`` on the int8 activations: the integer sums exactly, then the scales."""
        xf = x if self.linear_class == "bitlinear" else x.float()  # (each class's scale dtype)
        sx = _act_scale(xf)
        q = (xf * sx).round().clamp(-128, 127).to(torch.int8)
        y = torch._int_mm(q, self.codes8.T)
        if self.linear_class == "bitlinear":
            # bfloat16: Transformers' bf16 matmul rounds the exact sum once, so these are its bits
            if x.dtype == torch.bfloat16:
                y = y.to(x.dtype) / (self.weight_scale * sx)
            else:  # (float16 would overflow where Transformers' does: scaled in float32 instead)
                y = (y.float() / (self.weight_scale.float() * sx.float())).to(x.dtype)
            return y if self.bias is None else y + self.bias
        y = (y.float() / sx).to(x.dtype)
        return (y if self.bias is None else y + self.bias) * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.codes8 is not None and not x.requires_grad:
            return self._int_forward(x).reshape(*shape[:-1], self.out_features)
        if self.linear_class == "bitlinear":  # Transformers' BitLinear: the scale in the input's dtype
            sx = _act_scale(x).detach()
            y = self._matmul(_round(x * sx).clamp(-128, 127), shift=True)
            y = y / (self.weight_scale * sx)
            if self.bias is not None:
                y = y + self.bias
        else:  # AutoBitLinear: activations fake-quantized in float32, the output times weight_scale
            xf = x.float()
            sx = _act_scale(xf).detach()
            xq = (_round(xf * sx).clamp(-128, 127) / sx).to(x.dtype)
            y = self._matmul(xq, shift=False, bias=self.bias) * self.weight_scale
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"linear_class={self.linear_class}, kernel={self.kernel or 'none (' + self.kernel_problem + ')'}"
        )


INT_MM = "torch._int_mm"


def _int_mm_problem(codes: torch.Tensor) -> str | None:
    """Why ``torch._int_mm`` cannot run this layer's codes exactly here (None: it can): checked on
    one and on 17 random int8 rows against an integer matmul."""
    if not hasattr(torch, "_int_mm"):
        return f"torch {torch.__version__} has no torch._int_mm"
    gen = torch.Generator(device=codes.device).manual_seed(0)
    for rows in (1, 17):
        q = torch.randint(
            -128, 128, (rows, codes.shape[1]), generator=gen, device=codes.device, dtype=torch.int8
        )
        try:
            got = torch._int_mm(q, codes.T)
        except RuntimeError as exc:
            return f"it refuses a [{rows}, {codes.shape[1]}] x [{codes.shape[1]}, {codes.shape[0]}] product ({exc})"
        if not torch.equal(got.long(), q.long() @ codes.T.long()):
            return "its sums differ from an integer matmul"
    return None


def _check(weights: nn.Module, codes: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why the kernel's ``q @ T.T`` differs from the plain one on a random integer input (None: it agrees)."""
    gen = torch.Generator(device=codes.device).manual_seed(0)
    q = torch.randint(-128, 128, (4, codes.shape[1]), generator=gen, device=codes.device).to(dtype) * _SHIFT
    rows = min(64, codes.shape[0])  # a wrong layout shows in any rows; these are enough
    with torch.no_grad():
        ref = F.linear(q.float(), codes[:rows].float())
        got = weights.matmul(q.contiguous())[:, :rows].float()
    rel = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
    return None if rel <= CHECK_TOLERANCE else f"{rel:.2e} relative difference from the plain matmul"


class OnlineBitLinear(nn.Module):
    """Transformers' ``AutoBitLinear`` in ``online`` mode: full-precision weights, ternarized (and
    the activations rounded to int8) on every forward; gradients pass straight through both."""

    def __init__(self, in_features, out_features, *, bias, dtype, device=None, rms_norm_eps=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.rms_norm = None if rms_norm_eps is None else RMSNorm(in_features, rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        w = self.weight
        wf = w.float()
        scale = 1.0 / wf.abs().mean().clamp(min=1e-5)
        wq = ((wf * scale).round().clamp(-1, 1) / scale).to(w.dtype)
        xf = x.float()
        sx = _act_scale(xf)
        xq = ((xf * sx).round().clamp(-128, 127) / sx).to(x.dtype)
        return F.linear(x + (xq - x).detach(), w + (wq - w).detach(), self.bias)
