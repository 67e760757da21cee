"""Running a comparison's measurements: each candidate backend's library imported first (its
import warnings kept apart), the unquantized baseline measured, then each candidate quantized from
a deep copy and measured, a failure recorded in its row and the run going on. ``comparison``
prepares the inputs and recommends; ``measure``, ``text_quality``, ``timing`` and ``footprint``
measure one model."""

from __future__ import annotations

import copy
import gc
import os
import traceback
from collections.abc import Callable

import torch
from torch import nn

from .candidates import Spec
from .errors import ConfigError
from .footprint import PeakMemory, checkpoint_bytes, model_bytes
from .kernel_layer import short
from .layers import default_targets
from .measure import Bench, Row, captured_warnings, measure
from .report import summary
from .timing import PairedTiming

__all__ = ["import_libraries", "measure_all"]


def import_libraries(specs: list[Spec], say: Callable[[str], None]) -> dict[str, list[str]]:
    """Import each candidate backend's library before measuring, so what a library warns on import
    (once per process) is reported as its own and not as the first candidate's that ran. A failing
    import is left to that backend's candidates, which record it as their error."""
    from .dispatch import get_backend

    out: dict[str, list[str]] = {}
    for method in dict.fromkeys(spec.config.quant_method for spec in specs):
        with captured_warnings() as caught:
            try:
                get_backend(method).quantizer_class()
            except Exception:
                continue
        if caught:
            out[method] = list(dict.fromkeys(caught))
            for w in out[method]:
                say(f"warning on importing {method}: {w.splitlines()[0][:200]}")
    return out


def measure_all(
    model: nn.Module,
    specs: list[Spec],
    bench: Bench,
    say: Callable[[str], None],
    other_dtypes: tuple[torch.dtype, ...] = (),
) -> list[Row]:
    """The unquantized baseline's row, the unquantized model in each of ``other_dtypes`` (a copy,
    timed against the baseline like the candidates), then one row per candidate, each quantized
    from a deep copy (converted to the candidate's ``dtype`` first, when it names one)."""
    baseline = _unquantized_row("unquantized", model)
    say(f"[0/{len(specs)}] unquantized ({baseline.dtype}): measuring")
    base_run = run_form(model, bench)
    reference = measure(baseline, base_run, bench, None, say)
    timing = PairedTiming(baseline, base_run, bench)  # the baseline is timed in every candidate's rounds
    say(f"    {summary(baseline)}")
    rows = [baseline]
    for dtype in other_dtypes:
        name = dtype_name(dtype)
        say(f"[0/{len(specs)}] unquantized in {name} (a copy): measuring")
        with captured_warnings() as caught:
            work = to_dtype(copy.deepcopy(model), dtype)
            row = _unquantized_row(f"unquantized ({name})", work)
            run = run_form(work, bench)
            measure(row, run, bench, reference, say)
            timing.time(row, run, say)
        row.warnings = list(dict.fromkeys(caught))
        rows.append(row)
        say(f"    {summary(row)}")
        del work
        gc.collect()
    for i, spec in enumerate(specs, 1):
        row = Row(spec.label, spec.config.quant_method, spec.config.to_dict(), spec.select_rank)
        rows.append(row)
        say(f"[{i}/{len(specs)}] {spec.label}: quantizing" + (f" in {spec.dtype}" if spec.dtype else ""))
        _measure_candidate(row, model, spec, bench, reference, timing, say)
        timing.finish(rows[1:])  # every row against the baseline's samples so far
    return rows


def run_form(model: nn.Module, bench: Bench) -> nn.Module:
    """What is measured: ``model``, or ``torch.compile(model)`` with ``compare(compile=True)`` (a
    wrapper: the model itself, which candidates are copied from, stays as it is)."""
    return torch.compile(model) if bench.compile else model


def to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its floating-point parameters and stored buffers in ``dtype``, as loading it in
    that dtype gives: buffers the model computes (non-persistent, e.g. rotary ``inv_freq``) keep their
    dtype, where ``model.to(dtype)`` would round them too."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)
    return model


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dense_bytes(layer: nn.Module) -> int:
    return layer.weight.numel() * layer.weight.element_size()


def _stacked(model: nn.Module) -> tuple[int, int]:
    """How many modules hold stacked (3-D) weights, MoE experts of a known layout or not, and their
    bytes: they are full-precision weights quantization left (``quantplug.experts``)."""
    from .experts import stacked_weights, unknown_stacked

    known = stacked_weights(model)
    unknown = unknown_stacked(model)
    size = sum(t.numel() * t.element_size() for ts in known.values() for t in ts)
    return len(known) + len(unknown), size + sum(b for _, b in unknown.values())


def _unquantized_row(label: str, model: nn.Module) -> Row:
    row = Row(label, None, None, dtype=dtype_name(next(model.parameters()).dtype))
    row.weight_bytes = sum(_dense_bytes(m) for _, m in default_targets(model)) + _stacked(model)[1]
    row.model_bytes = model_bytes(model)
    row.checkpoint_bytes = checkpoint_bytes(model)
    return row


def _measure_candidate(
    row: Row,
    model: nn.Module,
    spec: Spec,
    bench: Bench,
    reference: torch.Tensor,
    timing: PairedTiming,
    say: Callable[[str], None],
) -> None:
    """Quantize a copy of ``model`` with ``spec`` and measure it into ``row``; a failure is recorded
    in ``row.error``, not raised."""
    work = None
    try:
        from .convert import quantize
        from .dispatch import AutoQuantizer

        calibration = None
        if AutoQuantizer.from_config(spec.config).needs_calibration():
            calibration = bench.calibration
            if not calibration:
                raise ConfigError(
                    f"{spec.label} needs calibration data, and this comparison has none: {bench.calibration_note}"
                )
            say(f"    calibrating on {sum(b.shape[-1] for b in calibration)} tokens not evaluated")
        with captured_warnings() as caught:
            work = copy.deepcopy(model)
            if spec.dtype is not None:
                work = to_dtype(work, getattr(torch, spec.dtype))
            row.dtype = dtype_name(next(work.parameters()).dtype)
            with PeakMemory() as peak:
                report = quantize(  # a bar on a terminal
                    work, spec.config, device=bench.device, progress=True, calibration_data=calibration
                )
            row.quantize_peak_bytes = peak.extra_bytes
            row.converted = len(report.converted)
            row.kernel = short(report.kernels)
            say(f"    quantized {len(report.converted)} layer(s) in {report.seconds:.1f} s; measuring")
            row.quantize_seconds = report.seconds
            # the layers the backend left in full precision count too: a candidate that converts a
            # quarter of the layers is not 4x smaller than it is (seen: group sizes that do not
            # divide a layer's inputs, skipped by the backend)
            done = set(report.converted)
            left = [m for name, m in default_targets(work) if name not in done]
            stacked_count, stacked_bytes = _stacked(work)  # MoE experts kept stacked, unquantized
            row.left_full_precision = len(left) + stacked_count
            row.weight_bytes = report.bytes_after + sum(_dense_bytes(m) for m in left) + stacked_bytes
            row.model_bytes = model_bytes(work)
            row.checkpoint_bytes = checkpoint_bytes(work)
            run = run_form(work, bench)
            measure(row, run, bench, reference, say)
            timing.time(row, run, say)
        row.warnings = list(dict.fromkeys(caught))
        say(f"    {summary(row)}")
        for w in row.warnings:
            say(f"    warning: {w.splitlines()[0][:200]}")
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        say(f"    failed: {row.error.splitlines()[0][:300]}")
        if os.environ.get("QUANTPLUG_COMPARE_TRACEBACK"):
            traceback.print_exc()
    finally:
        del work
        gc.collect()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
