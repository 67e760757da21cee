"""The figures a plugin declares on a ``Preset`` (``bits``, ``bits_per_weight``, ``rel_error``),
measured on one layer the way ``Preset``'s documentation defines them, and held to the declaration.
``select`` ranks presets by these figures, so the conformance kit (``quantplug.testing``) checks each
preset with ``measure_preset`` and ``figure_problems``.

The layer: ``nn.Linear(2048, 2048, bias=False)`` (``LAYER_SHAPE``), weights drawn N(0, 0.02) with
seed 0, in the preset's ``dtype`` (else float32), quantized through ``quantplug.quantize`` (a preset
that needs calibration gets ``CALIBRATION_ROWS`` Gaussian rows in 4 batches, seed 1), then run on 64
other Gaussian rows (seed 2). Measured:

- ``bits_per_weight`` = 8 x the bytes of every tensor ``Quantizer.module_tensors`` reports for the
  layer (codes, scales, zero points, code books, index tensors such as GPTQ's ``g_idx``), the bias
  excluded (``select`` counts biases with the unquantized parameters; this layer has none), divided
  by the 2048 x 2048 weights. A layer that keeps more in memory than it stores may declare that
  figure instead: the same count over its ``state_dict()`` (``Measured.memory_bits_per_weight``).
- ``rel_error`` = ``||y_q - y|| / ||y||`` over the 64 rows, ``y`` the dense layer's output in the
  same dtype.
- ``bits``: where the quantizer describes the layer as an integer grid (``Quantizer.integer_grid``),
  the grid's bits, and the codes must span more values than a grid of one bit less holds; always,
  ``bits`` must not exceed the measured bits per weight.

Tolerances (``BPW_TOLERANCE``, ``ERROR_TOLERANCE``) are stated below with their reasons.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .backend import Backend
from .capabilities import Preset

LAYER_SHAPE = (2048, 2048)
"""(out_features, in_features) of the measured layer: the shape the first-party figures were
measured on. Per-row and per-column metadata (a per-channel scale, GPTQ's ``g_idx``) cost bits in
proportion to 1 / in_features or 1 / out_features, so the shape is part of the definition."""

DEFAULT_DTYPE = "float32"
"""The layer's dtype for a preset that declares no ``dtype``. Backends that keep scales and zero
points in the model's dtype store twice as many metadata bits here as on a bfloat16 model."""

CALIBRATION_ROWS = 4096
"""Gaussian rows a preset that needs calibration is calibrated on (4 batches), twice the layer's
inputs: with fewer rows than inputs a Hessian-based method (GPTQ) fits directions the calibration
never saw, and its error on other rows exceeds round-to-nearest's (GPTQ int4-g128: 0.148 after 1024
rows, 0.124 after 4096)."""

BPW_TOLERANCE = 0.02
"""Declared ``bits_per_weight`` may differ from the measured by 2% of the measured (0.08 bits at
4 bits): room for a figure rounded to two decimals and for a code book or per-tensor scale whose
share changes with the shape, while a figure whose metadata dtype is wrong (a bfloat16 scale
declared for a float32 layer: 4.125 vs 4.25 at group 128) or whose code width is wrong fails."""

ERROR_TOLERANCE = 0.3
"""Declared ``rel_error`` may differ from the measured by 30% of the measured, plus
``ERROR_SLACK``: a figure measured on another random layer, another dtype or another number of
calibration rows stays inside (the first-party figures do); a figure 10x off (0.01 declared for
0.1) does not."""

ERROR_SLACK = 0.002
"""Absolute slack on ``rel_error``: the rounding of the output dtype alone (bfloat16 outputs carry
about 0.001-0.002 of relative error) must not fail an 8-bit preset declaring 0.005."""


@dataclasses.dataclass
class Measured:
    """What one preset's layer measured (``measure_preset``)."""

    dtype: str
    bits_per_weight: float
    rel_error: float
    stored: dict[str, str]
    """key -> ``dtype[shape]`` of every stored tensor counted (the bias excluded)."""
    memory_bits_per_weight: float | None = None
    """The same count over the module's own state (``state_dict()``) where it holds plain tensors and
    more bits than it stores (rtn's fused int4 layers keep a zero point next to each scale), else None."""
    grid_bits: int | None = None
    """The integer grid's bits, or None when the layer is not described as one (``grid_note`` says why)."""
    grid_span: int | None = None
    """How many code values the grid's codes span (max - min + 1)."""
    grid_note: str = ""
    kernel: str | None = None
    """What runs the layer here in ``dtype`` (``quantplug.kernels``): a kernel's name or why not."""

    def layer(self) -> str:
        out_f, in_f = LAYER_SHAPE
        return f"a {self.dtype} Linear({in_f}, {out_f}, bias=False)"


def check_preset(backend: Backend, name: str, device: str = "cpu") -> tuple[str | None, list[str]]:
    """``(why it cannot be measured on device, None when it can; figure_problems)`` of ``backend``'s
    preset ``name``."""
    preset = next(p for p in backend.presets if p.name == name)
    devices = preset.devices or backend.capabilities.devices
    if device.split(":")[0] not in devices:
        return f"preset {name!r} runs on {', '.join(devices)}, not on {device}", []
    if preset.min_cuda_capability:
        import torch

        have = torch.cuda.get_device_capability(device) if device.startswith("cuda") else None
        if have is None or have < preset.min_cuda_capability:
            return (
                f"preset {name!r} needs CUDA capability {preset.min_cuda_capability}, {device} has {have}",
                [],
            )
    measured = measure_preset(backend, preset, device)
    return None, figure_problems(preset, measured, backend.capabilities.max_rel_error)


def measure_preset(
    backend: Backend, preset: Preset, device: str = "cpu", dtype: str | None = None
) -> Measured:
    """Quantize the layer described in the module docstring with ``preset`` and measure it (in
    ``dtype``, default the preset's own)."""
    import torch
    from torch import nn

    import quantplug

    from .kernel_layer import grid_of, source_module
    from .walk import quantized_info

    dtype_name = dtype or preset.dtype or DEFAULT_DTYPE
    dtype = getattr(torch, dtype_name)
    out_f, in_f = LAYER_SHAPE
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).to(device=device, dtype=dtype)
    with torch.no_grad():
        dense[0].weight.normal_(0, 0.02)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).to(device=device, dtype=dtype)
    model.load_state_dict(dense.state_dict())
    config = preset.build(backend.config)
    calibration = None
    if quantplug.AutoQuantizer.from_config(config).needs_calibration():
        gen = torch.Generator().manual_seed(1)
        rows = CALIBRATION_ROWS // 4
        calibration = [torch.randn(rows, in_f, generator=gen).to(device, dtype) for _ in range(4)]
    report = quantplug.quantize(model, config, progress=False, calibration_data=calibration)
    assert report.converted == ["0"], f"preset {preset.name!r}: the layer was not quantized ({report})"
    x = torch.randn(64, in_f, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    with torch.no_grad():
        ref, out = dense(x).float(), model(x).float()
    info = quantized_info(model)
    quantizer = info.quantizer
    plugin_layer = source_module(quantizer, "0", model[0])  # (the backend's, also when a kernel runs it)
    tensors = {k: t for k, t in quantizer.module_tensors("0", plugin_layer).items() if k != "bias"}
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    measured = Measured(
        dtype=dtype_name,
        bits_per_weight=8 * stored / (out_f * in_f),
        rel_error=((out - ref).norm() / ref.norm()).item(),
        stored={k: f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for k, t in tensors.items()},
    )
    memory = _memory_bits(model[0], out_f * in_f)
    if memory is not None and memory > measured.bits_per_weight * (1 + BPW_TOLERANCE):
        measured.memory_bits_per_weight = memory
    measured.kernel = info.kernels.get("0")
    grid = grid_of(quantizer, "0", model[0])
    if isinstance(grid, str):
        measured.grid_note = grid
    else:
        grid.check("0")
        measured.grid_bits = grid.bits
        measured.grid_span = int(grid.codes.max()) - int(grid.codes.min()) + 1
    return measured


def _memory_bits(module: Any, weights: int) -> float | None:
    """8 x the bytes of ``module``'s own state but its bias / ``weights``; None when it holds anything
    but plain tensors (a tensor subclass's ``element_size`` is not what it stores)."""
    import torch

    state = {k: t for k, t in module.state_dict().items() if k != "bias"}
    if not state or any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in state.values()):
        return None
    return 8 * sum(t.numel() * t.element_size() for t in state.values()) / weights


def figure_problems(preset: Preset, measured: Measured, max_rel_error: Any = None) -> list[str]:
    """Each declared figure of ``preset`` that ``measured`` contradicts, as a sentence naming the
    preset, the declared and the measured figure (empty when all hold). ``max_rel_error``: the
    backend's ``Capabilities.max_rel_error``, the bound a preset without ``rel_error`` is held to."""
    where = f"preset {preset.name!r} (measured on {measured.layer()})"
    out = []
    bpw = measured.bits_per_weight
    if preset.bits > bpw + 1e-6:
        out.append(
            f"{where}: declares bits={preset.bits} but stores {bpw:.3f} bits per weight in all: "
            f"{preset.bits}-bit codes need at least {preset.bits} ({_stored(measured)})"
        )
    if measured.grid_bits is not None:
        if measured.grid_bits != preset.bits:
            out.append(
                f"{where}: declares bits={preset.bits}, measured {measured.grid_bits}: its integer grid "
                f"(Quantizer.integer_grid) is {measured.grid_bits}-bit"
            )
        elif measured.grid_span is not None and measured.grid_span <= 1 << (preset.bits - 1):
            out.append(
                f"{where}: declares bits={preset.bits}, but its codes take only {measured.grid_span} "
                f"values, which {preset.bits - 1} bits hold"
            )
    declared, memory = preset.bits_per_weight, measured.memory_bits_per_weight
    if (
        declared is not None
        and abs(declared - bpw) > BPW_TOLERANCE * bpw
        and (memory is None or abs(declared - memory) > BPW_TOLERANCE * memory)
    ):
        also = "" if memory is None else f" stored, {memory:.3f} in memory"
        out.append(
            f"{where}: declares bits_per_weight={declared!r}, measured {bpw:.3f}{also} "
            f"(tolerance {BPW_TOLERANCE:.0%}; {_stored(measured)})"
        )
    err = measured.rel_error
    if preset.rel_error is not None:
        if abs(preset.rel_error - err) > ERROR_TOLERANCE * err + ERROR_SLACK:
            out.append(
                f"{where}: declares rel_error={preset.rel_error!r}, measured {err:.4f} "
                f"(tolerance {ERROR_TOLERANCE:.0%} + {ERROR_SLACK})"
            )
    elif max_rel_error is not None and preset.bits in max_rel_error:
        bound = max_rel_error[preset.bits]
        if err > bound:
            out.append(
                f"{where}: declares no rel_error, so select takes Capabilities.max_rel_error[{preset.bits}] = "
                f"{bound!r}, but it measured {err:.4f}"
            )
    return out


def _stored(measured: Measured) -> str:
    return "stored: " + ", ".join(f"{k} {v}" for k, v in measured.stored.items())
