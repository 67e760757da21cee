"""``export``: re-encode a pre-quantized checkpoint in another backend's format without going back to
full precision.

Each quantized layer is asked for its ``IntegerGrid`` (the source plugin's ``Quantizer.integer_grid``:
integer codes, per-group scales, integer zero points); the target backend builds its config from the
grids' layouts (``Config.for_grids``) and its layers from the grids (``Quantizer.encode_grid``), so
the exported model computes what the source computed. A layer whose grid the target cannot hold
as it is (nf4's code book, float zero points, ...) is refused, saying why; with ``requantize`` it is
dequantized (run on the identity matrix) and quantized again by the target -- lossy, only when asked.
Float8 (e4m3) layers are described as ``Float8Grid`` instead (``Quantizer.float8_grid``) and copied
into a target that holds float8 (``Config.for_float8_grids``, ``Quantizer.encode_float8_grid``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .candidates import resolve
from .checkpoint import CONFIG_NAME, non_checkpoint_files, read_json
from .dispatch import AutoQuantizer, backends, get_backend
from .errors import ConfigError, PluginError
from .float8_contract import Float8Methods
from .grid import Float8Grid, Float8Layout, GridLayout, IntegerGrid
from .kernel_layer import grid_of
from .layers import as_linear_meta, is_eligible, set_submodule
from .walk import QuantizedModelInfo, attach_info, progress_bar, quantized_info


def _refuse_native_experts(folder: Any, info: QuantizedModelInfo, format: str) -> None:
    """Stacked experts a backend quantized whole hold no per-layer integer grid to re-encode."""
    if info.experts:
        raise ConfigError(
            f"{folder}: {next(iter(info.experts))} holds experts {info.config.quant_method!r} quantized "
            f"stacked, which export cannot re-encode yet; quantize the full-precision original with "
            f"--method {format}",
            field="format",
            value=format,
        )


def export_formats() -> list[str]:
    """Installed backends that can be an export target (their config class has ``for_grids``)."""
    return sorted(b.name for b in backends() if hasattr(b.config, "for_grids"))


def export(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str,
    requantize: Any = None,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> Path:
    """Write the pre-quantized checkpoint at ``path`` to ``out`` in ``format`` (a backend name, e.g.
    ``"compressed-tensors"``), layer by layer without rounding again.

    ``requantize``: a config of ``format`` (or a preset name, e.g. ``"W4A16"``) used for the layers
    whose grid ``format`` cannot hold: they are dequantized and quantized again (lossy). Without it,
    such layers are an error that names them and says why. Tokenizer and other non-weight files of
    ``path`` are copied to ``out``.
    """
    from .loading import load
    from .saving import save

    target = get_backend(format)
    if not hasattr(target.config, "for_grids"):
        raise ConfigError(
            f"backend {format!r} cannot be an export target (its config has no for_grids); installed "
            f"export formats: {', '.join(export_formats()) or 'none'}",
            field="format",
            value=format,
            allowed=export_formats(),
        )
    folder = Path(path)
    config_path = folder / CONFIG_NAME
    saved = read_json(config_path).get("quantization_config") if config_path.exists() else None
    if not isinstance(saved, dict):
        raise ConfigError(
            f"{folder} is not a quantized checkpoint (no quantization_config in {CONFIG_NAME}): quantize it "
            f"straight into the format instead: quantplug quantize {folder} --method {format} -o OUT",
            field="path",
            value=str(folder),
        )
    if saved.get("quant_method") == target.name:
        raise ConfigError(f"{folder} is already in {format} format", field="format", value=format)
    requant_config = _requantize_config(target, requantize)

    model = load(folder, progress=progress)
    info = quantized_info(model)
    source, names = info.quantizer, list(info.modules)
    _refuse_native_experts(folder, info, format)

    # two passes, one layer's grid in memory at a time: the layouts decide the target config, then each
    # grid is made again and encoded (grids of a whole model would cost a byte per weight)
    layouts, refused = _layouts(source, model, names, requant_config, progress)
    if refused:
        first = next(iter(refused))
        raise ConfigError(
            f"{len(refused)} of {len(names)} quantized layers of {folder} ({source.config.quant_method}) cannot be "
            f"written as {format} without rounding them again: {first}: {refused[first]}. To re-quantize them from "
            f"their dequantized weights (lossy: a second rounding on top of the first), pass requantize= a "
            f"{format} config or preset (CLI: --requantize, e.g. --requantize W4A16), or quantize the "
            f"full-precision original with --method {format}",
            field="requantize",
            value=None,
            allowed=[p.name for p in target.presets],
        )

    unquantized = [n for n, m in model.named_modules() if n and n not in layouts and is_eligible(m)]
    config, encode = _target_config(target, layouts, unquantized, folder, format)
    quantizer = AutoQuantizer.from_config(config)
    float_dtype = getattr(model, "dtype", None) or torch.float32
    _check_plan(quantizer, model, layouts, unquantized, float_dtype)
    with torch.no_grad(), progress_bar(len(layouts), f"encoding as {format}", progress) as bar:
        for name in layouts:
            grid = _grid(source, model, name, requant_config)
            meta = _meta_linear(model.get_submodule(name), grid.layout, grid.bias is not None, float_dtype)
            set_submodule(model, name, getattr(quantizer, encode)(name, meta, grid))
            bar.update(1)
    attach_info(model, QuantizedModelInfo(config, quantizer, list(layouts)))
    return save(model, out, max_shard_size=max_shard_size, extra_files=non_checkpoint_files(folder))


def _target_config(target, layouts: dict, unquantized: list[str], folder, format: str):
    """The target's config for the layers' grids, and the name of its quantizer's encoding method:
    integer grids (``for_grids`` / ``encode_grid``) or float8 ones (``for_float8_grids`` /
    ``encode_float8_grid``), never both in one export."""
    float8 = [n for n, lay in layouts.items() if isinstance(lay, Float8Layout)]
    if not float8:
        return target.config.for_grids(layouts, unquantized), "encode_grid"
    if len(float8) != len(layouts):
        integer = next(n for n, lay in layouts.items() if not isinstance(lay, Float8Layout))
        raise ConfigError(
            f"{folder}: export writes float8 weights or integer grids, not both, but {float8[0]} is float8 and "
            f"{integer} an integer grid (a re-quantized layer?); quantize the full-precision original with "
            f"--method {format}",
            field="requantize",
            value=None,
        )
    if not hasattr(target.config, "for_float8_grids"):
        float8_formats = sorted(b.name for b in backends() if hasattr(b.config, "for_float8_grids"))
        raise ConfigError(
            f"{folder}: {float8[0]} (and {len(float8) - 1} more layers) hold float8 (e4m3) weights, which "
            f"{format} cannot hold as they are (its config has no for_float8_grids); formats that hold them: "
            f"{', '.join(float8_formats) or 'none installed'}, or pass requantize= a {format} config (lossy)",
            field="format",
            value=format,
            allowed=float8_formats,
        )
    return target.config.for_float8_grids(layouts, unquantized), "encode_float8_grid"


def _grid(source, model: nn.Module, name: str, requant_config) -> IntegerGrid | Float8Grid | str:
    """The layer's ``IntegerGrid`` or ``Float8Grid`` (checked), re-quantized by ``requant_config``
    where the source has neither and that is given; else the source's reason."""
    module = model.get_submodule(name)
    grid = grid_of(source, name, module)
    if isinstance(grid, IntegerGrid):
        grid.check(name)
        problem = grid.layout.format_problem
        if problem is None:
            return grid
        grid = problem
    float8 = source.float8_grid(name, module)
    if isinstance(float8, Float8Grid):
        float8.check(name)
        return float8
    if type(source).float8_grid is not Float8Methods.float8_grid:
        grid = float8  # a source that speaks float8 says why this layer is not
    if requant_config is None:
        return str(grid)
    # a float8 layer the source refused is re-quantized in the target's integer format (lossy, asked)
    return _requantized_grid(model, name, requant_config)


def _layouts(source, model: nn.Module, names: list[str], requant_config, progress: bool):
    """Each quantized layer's ``GridLayout``, and the reasons of the layers that have none."""
    layouts: dict[str, GridLayout | Float8Layout] = {}
    refused: dict[str, str] = {}
    with progress_bar(len(names), "reading grids", progress) as bar:
        for name in names:
            grid = _grid(source, model, name, requant_config)
            if isinstance(grid, (IntegerGrid, Float8Grid)):
                layouts[name] = grid.layout
            else:
                refused[name] = grid
            bar.update(1)
    return layouts, refused


def _meta_linear(
    module: nn.Module, layout: GridLayout | Float8Layout, bias: bool, dtype: torch.dtype
) -> nn.Linear:
    """A meta ``nn.Linear`` with the grid's shape, the model's float ``dtype`` and the layer's bias."""
    bias = bias or getattr(module, "bias", None) is not None
    return nn.Linear(layout.in_features, layout.out_features, bias=bias, device="meta", dtype=dtype)


def _requantize_config(target, requantize: Any):
    if requantize is None:
        return None
    if isinstance(requantize, str) and ":" not in requantize:
        requantize = f"{target.name}:{requantize}"
    config = resolve(requantize).config
    if config.quant_method != target.name:
        raise ConfigError(
            f"requantize= must be a {target.name} config or preset, got one of {config.quant_method!r}",
            field="requantize",
            value=requantize,
            allowed=[p.name for p in target.presets],
        )
    return config


def _dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight a quantized layer computes with: its output on the identity matrix, less its bias."""
    in_f = getattr(module, "in_features", None) or as_linear_meta(module).in_features
    bias = getattr(module, "bias", None)
    dtype = next(
        (t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), torch.float32
    )
    device = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
    with torch.no_grad():
        eye = torch.eye(in_f, dtype=dtype, device=device)
        out = module(eye)
        b = bias.detach().to(out.dtype) if isinstance(bias, torch.Tensor) else None
        if b is not None:
            out = out - b
    return out.t().contiguous(), (b.clone() if b is not None else None)


def _requantized_grid(model: nn.Module, name: str, config) -> IntegerGrid:
    """A layer the target cannot hold as it is: dequantized, quantized again by ``config``'s backend,
    and described as that backend's grid."""
    module = model.get_submodule(name)
    weight, bias = _dense_weight(module)
    dense = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device
    )
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    quantizer = AutoQuantizer.from_config(config)
    why = quantizer.skip_reason(name, dense)
    if why:
        raise ConfigError(
            f"requantize: {config.quant_method} would leave {name} unquantized ({why})", field="requantize"
        )
    grid = quantizer.integer_grid(name, quantizer.quantize_module(name, dense))
    if not isinstance(grid, IntegerGrid):
        raise PluginError(
            f"requantize: {config.quant_method} quantized {name} but cannot describe the result: {grid}"
        )
    return grid


def _check_plan(
    quantizer, model: nn.Module, layouts: dict[str, GridLayout | Float8Layout], unquantized: list[str], dtype
) -> None:
    """The target config quantizes exactly the layers that have grids (else it would load differently)."""
    for name, layout in layouts.items():
        why = quantizer.skip_reason(name, _meta_linear(model.get_submodule(name), layout, False, dtype))
        if why:
            raise PluginError(
                f"export: the {quantizer.config.quant_method} config built for the grids skips {name} ({why})"
            )
    for name in unquantized:
        if quantizer.skip_reason(name, as_linear_meta(model.get_submodule(name))) is None:
            raise PluginError(
                f"export: the {quantizer.config.quant_method} config built for the grids would quantize {name}, "
                f"which the source kept in full precision"
            )
