"""``IntegerGrid``: a quantized layer's weight as integers on a uniform grid, the common language of
``quantplug.export`` -- a source backend describes its layer in it (``Quantizer.integer_grid``), a
target format builds its layer from it (``Quantizer.encode_grid``), so a checkpoint changes format
without going back to full precision. ``Float8Grid`` is the same for float8 (e4m3) weights with a
scale per tile, row or tensor (``Quantizer.float8_grid`` / ``Quantizer.encode_float8_grid``).

Light: no torch import at module level.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """The shape of a layer's grid, without its tensors: what a target config is built from."""

    bits: int
    group_size: int
    """Inputs per group; equal to ``in_features`` for one group per row (per-channel). The last group
    may be partial (``in_features`` not a multiple): it has its own scale."""
    symmetric: bool
    in_features: int
    out_features: int
    act_order: bool = False
    """The codes are in group order, not input order (``IntegerGrid.columns``: GPTQ's act-order)."""
    float_zero: bool = False
    """The zero points are floats (HQQ's), not integer codes: a kernel may take them, a format may not."""

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features

    @property
    def partial_group(self) -> bool:
        return self.in_features % self.group_size != 0

    @property
    def format_problem(self) -> str | None:
        """Why a checkpoint format with integer zero points, whole groups and no column order cannot
        hold this grid as it is (None: it can)."""
        if self.partial_group:
            return f"its last group is partial ({self.in_features} inputs, group_size {self.group_size})"
        if self.act_order:
            return "act-order (its codes are in group order, not input order), which export does not carry"
        if self.float_zero:
            return "its zero points are floats, not integer codes"
        return None


@dataclasses.dataclass
class IntegerGrid:
    """``weight[o, i] = (codes[o, i] - zero_point[o, g]) * scale[o, g]`` with ``g = i // group_size``
    (with ``columns``: ``weight[o, columns[i]]``, see below).

    codes       int8 [out, in], signed: -2**(bits-1) .. 2**(bits-1) - 1
    scale       float [out, groups], groups = ceil(in / group_size) (a partial last group has its own)
    zero_point  int8 [out, groups] in the same signed range, or ``None`` (symmetric: 0); or float
                [out, groups] (a fractional zero point, HQQ's; any float dtype, e.g. float32 beside
                16-bit scales to hold it exactly), which kernels take and export refuses
    bias        float [out] or ``None``
    columns     int64 [in] or ``None``: act-order (GPTQ's ``desc_act``), the codes are in group order
                and code column ``i`` is the layer's input ``columns[i]``; a kernel gathers its input
                in that order. ``None``: input order.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int
    bias: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    @property
    def float_zero(self) -> bool:
        return self.zero_point is not None and self.zero_point.dtype.is_floating_point

    @property
    def layout(self) -> GridLayout:
        out_f, in_f = self.codes.shape
        return GridLayout(
            self.bits,
            self.group_size,
            self.zero_point is None,
            in_f,
            out_f,
            act_order=self.columns is not None,
            float_zero=self.float_zero,
        )

    def check(self, name: str) -> None:
        """Raise ``PluginError`` when the grid does not hold together (a source plugin's bug)."""
        import torch

        def bad(why: str) -> PluginError:
            return PluginError(f"integer grid of {name!r}: {why}; report this to the source backend's plugin")

        if self.codes.dim() != 2 or self.codes.dtype != torch.int8:
            raise bad(f"codes must be int8 [out, in], got {self.codes.dtype} {list(self.codes.shape)}")
        out_f, in_f = self.codes.shape
        if not 1 <= self.bits <= 8:
            raise bad(f"bits={self.bits} is outside 1..8")
        if self.group_size <= 0:
            raise bad(f"group_size must be positive, got {self.group_size}")
        groups = -(-in_f // self.group_size)  # a partial last group has its own scale
        if tuple(self.scale.shape) != (out_f, groups) or not self.scale.dtype.is_floating_point:
            raise bad(
                f"scale must be float [{out_f}, {groups}], got {self.scale.dtype} {list(self.scale.shape)}"
            )
        lo, hi = -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        zero = None if self.float_zero else self.zero_point
        for what, t in (("codes", self.codes), ("zero_point", zero)):
            if t is None:
                continue
            if t.dtype != torch.int8:
                raise bad(f"{what} must be int8, got {t.dtype}")
            if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
                raise bad(
                    f"{what} values {int(t.min())}..{int(t.max())} leave the {self.bits}-bit range {lo}..{hi}"
                )
        if self.zero_point is not None and tuple(self.zero_point.shape) != (out_f, groups):
            raise bad(f"zero_point must be [{out_f}, {groups}], got {list(self.zero_point.shape)}")
        if self.columns is not None:
            cols = self.columns
            if cols.dtype != torch.int64 or tuple(cols.shape) != (in_f,):
                raise bad(f"columns must be int64 [{in_f}], got {cols.dtype} {list(cols.shape)}")
            if not torch.equal(torch.sort(cols).values, torch.arange(in_f, device=cols.device)):
                raise bad("columns is not a permutation of the inputs")

    def dequantize(self):
        """The float weight [out, in] the grid stands for (in the scale's dtype; computed in float32
        when the zero points are floats of another dtype), in input order."""
        import torch
        import torch.nn.functional as F

        out_f, in_f = self.codes.shape
        whole = self.scale.shape[1] * self.group_size  # inputs in whole groups (a partial last one padded)
        dtype = (
            torch.float32
            if self.float_zero and self.zero_point.dtype != self.scale.dtype
            else self.scale.dtype
        )
        codes = F.pad(self.codes, (0, whole - in_f)).reshape(out_f, -1, self.group_size).to(dtype)
        if self.zero_point is not None:
            codes = codes - self.zero_point.to(dtype).unsqueeze(-1)
        weight = (
            (codes * self.scale.to(dtype).unsqueeze(-1)).reshape(out_f, whole)[:, :in_f].to(self.scale.dtype)
        )
        if self.columns is None:
            return weight
        out = torch.empty_like(weight)
        out[:, self.columns] = weight
        return out


@dataclasses.dataclass(frozen=True)
class Float8Layout:
    """The shape of a layer's ``Float8Grid``, without its tensors: what a target config is built from."""

    block: tuple[int, int] | None
    """(rows, cols) of a tile sharing one scale; ``(1, in_features)``: one scale per row; None: per tensor."""
    in_features: int
    out_features: int

    @property
    def strategy(self) -> str:
        """``"tensor"``, ``"channel"`` (one scale per output row) or ``"block"`` (a scale per tile)."""
        if self.block is None:
            return "tensor"
        return "channel" if tuple(self.block) == (1, self.in_features) else "block"


@dataclasses.dataclass
class Float8Grid:
    """``weight[o, i] = float(codes[o, i]) * scale[o // bm, i // bn]`` with ``(bm, bn) = block``
    (ceil: a ragged last tile has its own scale): float8 weights, the float counterpart of
    ``IntegerGrid`` that ``quantplug.export`` copies into another float8 format as they are.

    codes  float8_e4m3fn [out, in]
    scale  float32 [ceil(out / bm), ceil(in / bn)]; [1, 1] when ``block`` is None (one scale per tensor)
    block  (bm, bn), or None for one scale per tensor
    bias   float [out] or ``None``
    """

    codes: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None
    bias: torch.Tensor | None = None

    @property
    def layout(self) -> Float8Layout:
        out_f, in_f = self.codes.shape
        return Float8Layout(None if self.block is None else tuple(self.block), in_f, out_f)

    def grid_shape(self) -> tuple[int, int]:
        if self.block is None:
            return (1, 1)
        out_f, in_f = self.codes.shape
        bm, bn = self.block
        return (-(-out_f // bm), -(-in_f // bn))

    def check(self, name: str) -> None:
        """Raise ``PluginError`` when the grid does not hold together (a source plugin's bug)."""
        import torch

        def bad(why: str) -> PluginError:
            return PluginError(f"float8 grid of {name!r}: {why}; report this to the source backend's plugin")

        if self.codes.dim() != 2 or self.codes.dtype != torch.float8_e4m3fn:
            raise bad(
                f"codes must be float8_e4m3fn [out, in], got {self.codes.dtype} {list(self.codes.shape)}"
            )
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise bad(f"block must be (rows, cols) of positive integers or None, got {self.block!r}")
        shape = self.grid_shape()
        if tuple(self.scale.shape) != shape or self.scale.dtype != torch.float32:
            raise bad(f"scale must be float32 {list(shape)}, got {self.scale.dtype} {list(self.scale.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.codes.shape[0],):
            raise bad(f"bias must be [{self.codes.shape[0]}], got {list(self.bias.shape)}")

    def dequantize(self):
        """The float32 weight [out, in] the grid stands for."""
        out_f, in_f = self.codes.shape
        bm, bn = self.block or (out_f, in_f)
        full = self.scale.repeat_interleave(bm, 0)[:out_f].repeat_interleave(bn, 1)[:, :in_f]
        return self.codes.float() * full
