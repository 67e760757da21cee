"""``quantplug.Kernel``: the base class of a kernel (``quantplug.kernels``). Light: no torch import."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .grid import GridLayout, IntegerGrid


class Kernel:
    """A matmul for integer-grid layers. Subclass it, set the class attributes, implement
    ``layout_problem`` and ``build``; register an instance (``quantplug.register_kernel``) or name
    the class in a ``quantplug_kernels`` entry point.

    ``build(grid, dtype)`` returns an ``nn.Module`` holding the grid's codes in the kernel's layout
    (scales and zero points as it needs them, in ``dtype``), with three methods:

    - ``matmul(x)``: ``x`` [rows, in] contiguous, in group order (the core gathers act-order inputs
      first), in a dtype of ``dtypes``; returns ``x @ weight.T`` [rows, out] without the bias;
    - ``codes()``: the grid's codes back, int8 [out, in] (the core rebuilds the plugin's layer from
      them when the model is saved);
    - ``dequantize(dtype)``: the weight [out, in] (group order) in ``dtype``: the dense path, run
      from ``dense_from`` rows on and whenever autograd needs the input's gradient.
    """

    name: str = ""
    description: str = ""
    device_type: str = "cpu"
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    """Activation dtypes (torch dtype names) the kernel is fast with."""
    dense_from: int | None = None
    """Rows (batch x tokens) from which the dequantized dense matmul is faster (None: never)."""
    priority: int = 0
    """Among kernels that take a layer, the highest priority runs it."""

    def machine_problem(self) -> str | None:
        """Why this machine / torch cannot run the kernel fast (None: it can). Asked once."""
        return None

    def layout_problem(self, layout: GridLayout) -> str | None:
        """Why the kernel does not take grids of ``layout`` (None: it does)."""
        raise NotImplementedError

    def build(self, grid: IntegerGrid, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Kernel {self.name}>"
