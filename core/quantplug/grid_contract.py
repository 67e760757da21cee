"""The integer-grid methods of ``quantplug.Quantizer``: how a backend describes its layers as
``quantplug.IntegerGrid`` (``integer_grid``) and rebuilds them from one (``encode_grid``), which
``quantplug.export`` (a layer changes format without rounding again) and the kernel choice
(``quantplug.kernels``: a layer runs on the fastest kernel for its grid) build on; and
``kernel_settings``. Mixed into ``quantplug.Quantizer`` on top of ``Float8Methods`` (the chain
keeps backend.py within its size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import PluginError
from .float8_contract import Float8Methods

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .grid import IntegerGrid


class GridMethods(Float8Methods):
    """Mixed into ``quantplug.Quantizer``: the integer-grid methods (see the module docstring)."""

    def integer_grid(self, name: str, qmodule: nn.Module) -> IntegerGrid | str:
        """``qmodule``'s weight as a ``quantplug.IntegerGrid`` (integer codes, per-group scales and
        integer zero points), which ``quantplug.export`` re-encodes in another format without
        rounding again; or a sentence saying why the layer is not one (a non-uniform code book such
        as nf4, float zero points, quantized activations, ...). Default: the plugin does not say."""
        who = self.backend.plugin or f"backend {self.backend.name!r}"
        return f"{who} does not describe its layers as integer grids (Quantizer.integer_grid)"

    def encode_grid(self, name: str, module: nn.Linear, grid: IntegerGrid) -> nn.Module:
        """This backend's quantized module for ``module`` (an ``nn.Linear`` on the meta device: shape,
        dtype, bias) holding exactly ``grid``. Implemented by export targets, whose config class
        also has ``for_grids(layouts, unquantized)``, and by backends whose layers run on kernels
        (``quantplug.kernels``: the kernel keeps the grid, ``save`` rebuilds the layer with this,
        so ``module_tensors`` of the result must equal the original layer's bit for bit)."""
        raise PluginError(
            f"backend {self.backend.name!r} cannot be an export target: its quantizer does not implement "
            f"encode_grid()"
        )

    def kernel_settings(self) -> dict[str, Any]:
        """How this config's layers use kernels when ``quantize`` / ``load`` are not told
        (``kernel=None``): ``{"kernel": "auto" | "none" | "required" | a kernel's name,
        "dense_from": rows from which layers run dequantized (None: the kernel's own)}``."""
        return {}
