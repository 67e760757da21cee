"""``KernelLinear`` and the pass that puts quantized layers on kernels (``quantplug.kernels``).

After ``quantize`` / ``load``, each quantized layer whose backend describes it as an
``IntegerGrid`` is offered to the kernels. A layer moves to a kernel only when:

1. a kernel takes its grid on its device and in the model's dtype;
2. the backend rebuilds exactly the same checkpoint tensors from the grid (``encode_grid``, then
   ``module_tensors``, compared bit for bit): so ``save`` writes what the plugin would have;
3. the kernel's output matches the plugin's own forward on a check input (relative difference
   at most ``CHECK_TOLERANCE``); otherwise the layer keeps the plugin's module and a warning names
   the kernel: never a silently wrong model.

Every layer's outcome (the kernel's name, or why it runs its plugin's forward) is kept in the
model's ``QuantizedModelInfo.kernels``; ``compare`` and ``QuantizeReport`` show it.
"""

from __future__ import annotations

import collections
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, PluginError, QuantplugError
from .grid import IntegerGrid
from .kernels import AUTO, NONE, REQUIRED, Kernel, available_kernels, choose

logger = logging.getLogger("quantplug")

CHECK_TOLERANCE = 1e-2
OWN = "own forward"
"""The start of a layer's entry in ``QuantizedModelInfo.kernels`` when it runs its plugin's module."""


class KernelLinear(nn.Module):
    """A quantized layer run by a ``Kernel``: the kernel's layout of the codes (``weights``), the
    grid's scales and zero points as the plugin stored them (``grid()`` gives the grid back), the
    act-order input order and the bias."""

    def __init__(self, kernel: Kernel, grid: IntegerGrid, dtype: torch.dtype, dense_from: int | None = None):
        super().__init__()
        self.kernel = kernel.name
        self.dense_from = kernel.dense_from if dense_from is None else dense_from
        self.bits, self.group_size = grid.bits, grid.group_size
        self.out_features, self.in_features = grid.codes.shape
        self.dtype = dtype  # the model's float dtype: the plugin's layer is rebuilt for it on save
        self.weights = kernel.build(grid, dtype)
        # the grid's scales, unless the kernel holds them bit for bit (then they are not kept twice)
        held = getattr(self.weights, "scales", None)
        same = held is not None and _same({"s": held()}, {"s": grid.scale}) is None
        self.register_buffer("scale", None if same else grid.scale.detach().clone())
        self.register_buffer(
            "zero_point", None if grid.zero_point is None else grid.zero_point.detach().clone()
        )
        self.register_buffer("columns", None if grid.columns is None else grid.columns.detach().clone())
        bias = None if grid.bias is None else nn.Parameter(grid.bias.detach().clone(), requires_grad=False)
        self.bias = bias

    def grid(self) -> IntegerGrid:
        bias = None if self.bias is None else self.bias.detach()
        return IntegerGrid(
            self.weights.codes().contiguous(),
            self.weights.scales().contiguous() if self.scale is None else self.scale,
            self.zero_point,
            self.bits,
            self.group_size,
            bias,
            self.columns,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.columns is not None:
            x = x.index_select(-1, self.columns)
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        bias = None if self.bias is None else self.bias.to(x.dtype)
        dense = self.dense_from is not None and rows >= self.dense_from
        if dense or (torch.is_grad_enabled() and x.requires_grad) or not self._runs(x):
            weight = self.weights.dequantize(x.dtype)
            if torch.is_grad_enabled() and x.requires_grad:
                weight = weight.clone()  # autograd keeps it: not the shared scratch buffer
            return F.linear(x, weight, bias)
        out = self.weights.matmul(x.reshape(-1, x.shape[-1]).contiguous())
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias

    def _runs(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)

    def extra_repr(self) -> str:
        order = ", act-order" if self.columns is not None else ""
        zero = "sym" if self.zero_point is None else "asym"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, {zero}{order}, kernel={self.kernel} below {self.dense_from} rows"
        )


def source_module(quantizer, name: str, module: nn.Module) -> nn.Module:
    """The plugin's module for ``module`` (a ``KernelLinear`` is rebuilt with ``encode_grid``)."""
    if not isinstance(module, KernelLinear):
        return module
    meta = nn.Linear(
        module.in_features, module.out_features, module.bias is not None, device="meta", dtype=module.dtype
    )
    return quantizer.encode_grid(name, meta, module.grid())


def grid_of(quantizer, name: str, module: nn.Module) -> IntegerGrid | str:
    """``Quantizer.integer_grid`` of a layer, also when a kernel runs it."""
    if isinstance(module, KernelLinear):
        return module.grid()
    return quantizer.integer_grid(name, module)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str | None:
    """Why two tensor dicts differ (None: same keys, dtypes, shapes and bits; NaN bit patterns
    compare as bits: HQQ stores packed codes viewed as floats)."""
    if a.keys() != b.keys():
        return f"tensors {sorted(a)} instead of {sorted(b)}"
    for k in a:
        x, y = a[k].detach().cpu(), b[k].detach().cpu()
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"a different {k!r}"
        if x.is_floating_point() and x.numel():
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            x, y = x.contiguous().view(bits), y.contiguous().view(bits)
        if not torch.equal(x, y):
            return f"a different {k!r}"
    return None


def float_dtype_of(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating-point parameters (its activations' dtype), or None."""
    for p in model.parameters():
        if p.dtype.is_floating_point:  # (meta too: a model being loaded)
            return p.dtype
    return None


def kernel_choices(model: nn.Module) -> dict[str, str]:
    """For a model quantplug quantized or loaded: each quantized layer's kernel, or why it runs its
    backend's own module (``{}`` for any other model)."""
    from .walk import quantized_info

    info = quantized_info(model)
    return dict(info.kernels) if info is not None else {}


def _device(module: nn.Module) -> torch.device | None:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return None


def _relative_difference(kernel_layer: nn.Module, own: nn.Module, dtype: torch.dtype, in_f: int) -> float:
    x = torch.randn(2, in_f, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = own(x).float()
    got = kernel_layer(x).float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def _try(quantizer, name: str, module: nn.Module, dtype: torch.dtype, settings: dict) -> nn.Module | str:
    """The ``KernelLinear`` for layer ``name``, or why it keeps the plugin's module."""
    wanted = settings["kernel"]
    device = _device(module)
    if device is None or device.type == "meta":
        return f"{OWN}: the layer is not in memory (offloaded)"
    grid = quantizer.integer_grid(name, module)
    if not isinstance(grid, IntegerGrid):
        return f"{OWN}: {grid}"
    grid.check(name)
    kernel, why = choose(grid.layout, device.type, dtype, AUTO if wanted == REQUIRED else wanted)
    if kernel is None:
        if wanted != AUTO:
            raise ConfigError(
                f"kernel={wanted!r} does not run layer {name!r}: {why}",
                field="kernel",
                value=wanted,
                allowed=f"'auto', 'none', 'required' or one of {sorted(available_kernels())}",
            )
        return f"{NO_KERNEL} ({why})"
    layer = KernelLinear(kernel, grid, dtype, settings.get("dense_from"))
    try:
        rebuilt = source_module(quantizer, name, layer)
        differs = _same(quantizer.module_tensors(name, rebuilt), quantizer.module_tensors(name, module))
    except (QuantplugError, NotImplementedError) as exc:
        differs = f"encode_grid failed ({exc})"
    if differs:
        return f"{OWN}: the backend cannot rebuild its checkpoint tensors from the grid ({differs})"
    with torch.no_grad():
        rel = _relative_difference(layer, module, dtype, grid.codes.shape[1])
    if not rel <= CHECK_TOLERANCE:
        return f"{OWN}: {kernel.name} {FAILED} ({rel:.2e} relative; the check allows {CHECK_TOLERANCE:g})"
    return layer


def use_kernels(
    model: nn.Module, quantizer, names: list[str], native: dict, dtype, kernel: str | None = None
) -> dict:
    """Put each of ``names`` on a kernel where it can run one (see the module docstring); returns
    {layer: kernel name or why it runs its own forward}. ``kernel`` (None: the quantizer's
    ``kernel_settings()``, by default ``"auto"``): ``"auto"``, ``"none"``, ``"required"`` (as auto,
    but a layer no kernel runs is an error) or a kernel's name (only that one; the same error)."""
    from .layers import set_submodule

    settings = {"kernel": AUTO, "dense_from": None, **quantizer.kernel_settings()}
    if kernel is not None:
        settings["kernel"] = kernel
    kernel = settings["kernel"]
    if kernel not in (AUTO, NONE, REQUIRED) and kernel not in available_kernels():
        raise ConfigError(
            f"unknown kernel {kernel!r}",
            field="kernel",
            value=kernel,
            allowed=f"'auto', 'none', 'required' or one of {sorted(available_kernels())}",
        )
    if kernel == NONE:
        return {name: f"{OWN}: kernel='none'" for name in names}
    out = {}
    has_grids = type(quantizer).integer_grid is not _base_integer_grid()
    for name in names:
        if name in native:
            out[name] = f"{OWN}: stacked experts"
        elif not has_grids:
            out[name] = f"{OWN}: {quantizer.integer_grid(name, None)}"
        elif dtype is None:
            out[name] = (
                f"{OWN}: the model has no floating-point parameters to take the activations' dtype from"
            )
        else:
            with torch.no_grad():
                result = _try(quantizer, name, model.get_submodule(name), dtype, settings)
            if isinstance(result, str):
                out[name] = result
            else:
                set_submodule(model, name, result)
                out[name] = result.kernel
    missed = [(n, v) for n, v in out.items() if v.startswith(OWN) and n not in native]
    if kernel != AUTO and missed:  # "required" or a kernel's name: every layer, or an error
        raise ConfigError(
            f"kernel={kernel!r}: layer {missed[0][0]!r} runs no kernel ({missed[0][1].removeprefix(OWN + ': ')})"
            + (f", and {len(missed) - 1} more layer(s)" if len(missed) > 1 else ""),
            field="kernel",
            value=kernel,
            allowed="'auto' (layers no kernel takes run their backend's module) or 'none'",
        )
    _say_once(out)
    return out


def apply_kernels(
    model: nn.Module, info, kernel: str | None = None, dtype: torch.dtype | None = None
) -> None:
    """``use_kernels`` on the layers of ``info`` (a model's ``QuantizedModelInfo``), recorded there;
    ``dtype``: the model's float dtype (default: its floating-point parameters')."""
    dtype = dtype or float_dtype_of(model)
    info.kernels = use_kernels(model, info.quantizer, info.modules, info.experts, dtype, kernel)


def _base_integer_grid():
    from .grid_contract import GridMethods

    return GridMethods.integer_grid


def summary(choices: dict[str, str]) -> dict[str, int]:
    """{kernel name or reason: layers}, most layers first."""
    return dict(collections.Counter(choices.values()).most_common())


def short(choices: dict[str, str]) -> str:
    """One cell for a table: ``torch-int4-cpu`` / ``own forward`` / ``torch-int4-cpu 180/210``."""
    if not choices:
        return ""
    counts = collections.Counter(v if not v.startswith(OWN) else OWN for v in choices.values())
    if len(counts) == 1:
        return next(iter(counts))
    best, n = counts.most_common(1)[0]
    return f"{best} {n}/{len(choices)}"


_warned: set[str] = set()
FAILED = "failed the check at load: its output differs from the backend's own forward"
NO_KERNEL = f"{OWN}: no kernel takes it"


def _say_once(choices: dict[str, str]) -> None:
    """Log what runs where; warn (once per reason and process) about grids no kernel takes."""
    reasons = collections.Counter(v for v in choices.values() if v.startswith(OWN))
    ran = len(choices) - sum(reasons.values())
    failed = [(n, v) for n, v in choices.items() if FAILED in v]
    if failed:  # every time: a kernel that computes something else is news
        names = ", ".join(repr(n) for n, _ in failed[:3]) + (" ..." if len(failed) > 3 else "")
        warnings.warn(
            f"quantplug: {failed[0][1].removeprefix(OWN + ': ').split(' ')[0]!r} kernel disabled for "
            f"{len(failed)} layer(s) ({names}): {failed[0][1].split(FAILED, 1)[0].removeprefix(OWN + ': ')}"
            f"{FAILED}{failed[0][1].split(FAILED, 1)[1]}; they run the backend's module",
            stacklevel=4,
        )
    for why, n in reasons.items():
        logger.info("quantplug: %d layer(s) run their backend's module (%s)", n, why.removeprefix(OWN + ": "))
        if why.startswith(NO_KERNEL) and why not in _warned:
            _warned.add(why)
            warnings.warn(
                f"quantplug: {n} layer(s) run their backend's own forward (slower): {why.removeprefix(OWN + ': ')}",
                stacklevel=4,
            )
    if ran:
        logger.info("quantplug: %d layer(s) run on kernels: %s", ran, summary(choices))


__all__ = ["KernelLinear", "PluginError", "grid_of", "source_module", "use_kernels"]
