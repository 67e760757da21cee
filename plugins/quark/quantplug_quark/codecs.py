"""The arithmetic of Quark's stored formats in plain PyTorch, as amd-quark 0.13 defines it on import
(``quark.torch.export.nn.modules.realquantizer`` unpacking, ``quark::dequantize`` and
``quark::scaled_fake_quantize`` in ``quark.torch.kernel.hw_emulation``):

- int4 / uint4 codes packed eight per int32 (``Pack_4_bits``): nibble ``i`` of a word holds value
  ``order[i]`` of its eight, ``order = [0, 2, 4, 6, 1, 3, 5, 7]`` for ``pack_method: "reorder"``
  (the identity for ``"order"``); per-group weights and zero points are stored transposed
  ([in, out / 8] and [in / group, out / 8]) and per-group scales too ([in / group, out]);
- fp4 (e2m1) codes two per byte, the low nibble first; an e8m0 scale byte ``b`` is ``2**(b - 127)``;
- dequantization in float32: ``(q - zero_point) * scale`` for integers, ``q * scale`` for floats,
  per tensor, per output channel or per group along the inputs;
- static activation fake quantization: fp8 ``(x / s).clamp(+-448)`` cast to e4m3 and back, ``* s``,
  in the activations' dtype; integers through ``torch.fake_quantize_per_tensor_affine`` in float32.
"""

from __future__ import annotations

import torch

from .specs import TensorSpec

REORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""``pack_method: "reorder"``: the value each nibble of an int32 word holds."""
QMIN_QMAX = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
E4M3_MAX = 448.0
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, reorder: bool, signed: bool) -> torch.Tensor:
    """int32 words [rows, cols / 8] -> int32 codes [rows, cols] (-8..7 when ``signed``, else 0..15)."""
    words = packed.to(torch.int32)
    # value j of a word sits in nibble inverse[j]: shift each value out of its own nibble
    shifts = _REORDER_SHIFTS if reorder else _SHIFTS
    codes = (words.unsqueeze(-1) >> shifts.to(words.device)) & 0xF  # [rows, cols/8, 8]
    codes = codes.reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    return codes - ((codes & 8) << 1) if signed else codes


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for nibble, value in enumerate(order):
        inv[value] = nibble
    return tuple(inv)


_REORDER_SHIFTS = torch.tensor([4 * n for n in _inverse(REORDER)], dtype=torch.int32)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., cols / 2] (two e2m1 codes, the low nibble first) -> float32 [..., cols]."""
    table = torch.tensor(_E2M1, dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return table[codes.long()]


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes -> float32 ``2**(b - 127)`` (b = 0: 2**-127; b = 255: inf, as Quark computes it)."""
    b = scale.view(torch.uint8).to(torch.int32)
    normal = (b << 23).view(torch.float32)
    return torch.where(b == 0, torch.full_like(normal, 2.0**-127), normal)


def _per_group(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``q`` [out, in] float32, ``scale`` / ``zero`` [out, in / g] -> float32 [out, in]."""
    out, cols = q.shape
    groups = scale.shape[-1]
    grouped = q.reshape(out, groups, cols // groups)
    if zero is not None:
        grouped = grouped - zero.to(torch.float32).unsqueeze(-1)
    return (grouped * scale.to(torch.float32).unsqueeze(-1)).reshape(out, cols)


def dequantize_weight(
    spec: TensorSpec,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    reorder: bool,
) -> torch.Tensor:
    """The float32 [out, in] weight a stored Quark weight stands for."""
    if spec.dtype == "fp4":
        return _per_group(unpack_fp4(weight), e8m0_to_float(scale), None)
    if spec.dtype == "fp8_e4m3":
        s = scale.to(torch.float32)
        return weight.to(torch.float32) * (s.unsqueeze(-1) if s.dim() else s)
    if spec.dtype in ("int4", "uint4"):
        signed = spec.dtype == "int4"
        if spec.qscheme == "per_group":  # stored transposed: [in, out / 8], [in / g, out], [in / g, out / 8]
            q = unpack_int4(weight, reorder, signed).t()
            z = unpack_int4(zero_point, reorder, signed).t() if zero_point is not None else None
            return _per_group(q.to(torch.float32), scale.t(), z)
        q = unpack_int4(weight, reorder, signed)
        z = (
            unpack_int4(zero_point.reshape(1, -1), reorder, signed).reshape(-1)
            if zero_point is not None
            else None
        )
    else:  # int8 / uint8
        q, z = weight.to(torch.int32), zero_point.to(torch.int32) if zero_point is not None else None
    s = scale.to(torch.float32)
    if spec.qscheme == "per_channel":
        s = s.unsqueeze(-1)
        z = z.unsqueeze(-1) if z is not None else None
    q = q.to(torch.float32) if z is None else (q - z).to(torch.float32)
    return q * s


def fake_quantize(
    spec: TensorSpec, x: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """Quark's fake quantization of activations ``x`` (same dtype back): static per tensor
    (``scale``, ``zero_point`` stored), or dynamic MXFP4 (computed from ``x``)."""
    if spec.is_dynamic:
        return fake_quantize_mxfp4(x, spec.scale_calculation_mode)
    s = scale.to(device=x.device, dtype=torch.float32)
    if spec.dtype == "fp8_e4m3":
        y = (x / s).clamp(-E4M3_MAX, E4M3_MAX)
        return y.to(torch.float8_e4m3fn).to(y.dtype) * s
    qmin, qmax = QMIN_QMAX[spec.dtype]
    z = (
        zero_point.to(device=x.device, dtype=torch.int32)
        if zero_point is not None
        else torch.zeros((), dtype=torch.int32)
    )
    out = torch.fake_quantize_per_tensor_affine(x.to(torch.float32), s.reshape(()), z.reshape(()), qmin, qmax)
    return out.to(x.dtype)


def _mx_scale(amax: torch.Tensor, mode: str | None) -> torch.Tensor:
    """The e8m0 (power of two) scale of blocks with largest magnitude ``amax`` (float32), as Quark's
    ``PerBlockMXObserver`` computes it for fp4 (emax 2): ``"even"`` (the default) rounds ``amax`` to a
    power of two, up from 1.75 x 2**n (``quantization.utils.even_round``); ``"floor"`` / ``"ceil"``."""
    emax = 2
    if mode in (None, "even"):
        bits = amax.view(torch.int32) + (1 << 21)
        rounded = (bits & (0x1FF << 23)).view(torch.float32)
        rounded = rounded.masked_fill(amax == 0, 2.0**-126)
        return torch.exp2((torch.floor(torch.log2(rounded)) - emax).clamp(-127, 127))
    exponent = torch.floor(torch.log2(amax)) if mode == "floor" else torch.ceil(torch.log2(amax))
    scale = torch.pow(2.0, exponent - emax)
    return scale.masked_fill(scale == 0, torch.finfo(torch.float32).eps)


def _round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """``y`` rounded to the nearest e2m1 value (ties to the even code), saturated at +-6, as Quark's
    ``fake_quantize_to_low_precision_fp(y, 2, 1, 6.0)``; a result of zero is +0."""
    a = y.abs()
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    q = q.clamp(max=6.0)
    q = torch.where(q == 0, torch.zeros_like(q), torch.copysign(q, y))
    return torch.where(torch.isfinite(y), q, y)


def fake_quantize_mxfp4(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """Quark's dynamic MXFP4 fake quantization of ``x`` along its last dimension (blocks of 32)."""
    shape = x.shape
    blocks = x.to(torch.float32).reshape(-1, shape[-1] // 32, 32)
    scale = _mx_scale(blocks.abs().amax(dim=-1, keepdim=True), mode)
    out = _round_e2m1(blocks / scale) * scale
    return out.reshape(shape).to(x.dtype)
