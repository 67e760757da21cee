"""The float8 side of ``quantplug.export``: what a source backend implements to describe its float8
(e4m3) layers as ``quantplug.Float8Grid`` (``float8_grid``), and what a target implements to build
its layers from them (``encode_float8_grid``, with ``for_float8_grids(layouts, unquantized)`` on its
config class). Mixed into ``quantplug.Quantizer`` on top of ``ExpertsMethods`` (the chain keeps
backend.py within its size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import PluginError
from .experts_contract import ExpertsMethods

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .grid import Float8Grid


class Float8Methods(ExpertsMethods):
    """Mixed into ``quantplug.Quantizer``: the float8 grid methods of ``quantplug.export`` (and,
    through ``ExpertsMethods``, the native experts path)."""

    def float8_grid(self, name: str, qmodule: nn.Module) -> Float8Grid | str:
        """``qmodule``'s weight as a ``quantplug.Float8Grid`` (e4m3 codes and float32 scales per tile,
        row or tensor), which ``quantplug.export`` copies into another float8 format as it is; or a
        sentence saying why the layer is not one (e8m0 micro-scales, static activation scales, ...).
        Default: the plugin does not say."""
        who = self.backend.plugin or f"backend {self.backend.name!r}"
        return f"{who} does not describe its layers as float8 grids (Quantizer.float8_grid)"

    def encode_float8_grid(self, name: str, module: nn.Linear, grid: Float8Grid) -> nn.Module:
        """This backend's quantized module for ``module`` (an ``nn.Linear`` on the meta device: shape,
        dtype, bias) holding exactly ``grid``. Implemented by float8 export targets, whose config
        class also has ``for_float8_grids(layouts, unquantized)``; ``self.config`` is that config."""
        raise PluginError(
            f"backend {self.backend.name!r} cannot be a float8 export target: its quantizer does not implement "
            f"encode_float8_grid()"
        )
