"""Measuring one model for ``compare``: weight bytes, perplexity or output error, prefill and
decode latency, and the warnings its backend raises meanwhile.

``Bench`` is what every model of a comparison is measured on (token ids or the caller's inputs,
already on the device); ``measure`` fills a ``Row`` from it; ``environment`` records the machine and
the versions measured with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import inspect
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import __version__
from .devices import run_batch
from .encoder_quality import score
from .hardware import cpu_hardware, detect_hardware
from .text_quality import perplexity, windows
from .versions import installed_version


@dataclasses.dataclass
class Row:
    label: str
    backend: str | None
    """None for the unquantized model (the first row, and the same model in another dtype)."""
    config: dict[str, Any] | None
    select_rank: int | None = None
    dtype: str | None = None
    """The dtype of the model's floating-point parameters when it ran (``"bfloat16"``)."""
    kernel: str | None = None
    """What ran the quantized layers (``quantplug.kernels``): a kernel's name, ``"own forward"``
    (the backend's module), or the most common of them with its share (``"torch-int4-cpu 12/14"``)."""
    weight_bytes: int | None = None
    """Bytes of the weights of the layers a default config quantizes: the converted layers' stored
    tensors plus the weights of those the backend left in full precision (every one of them, in
    full precision, for the unquantized rows)."""
    model_bytes: int | None = None
    """Bytes of every tensor the loaded model holds (``footprint.model_bytes``): parameters, buffers
    and the tensors backends keep elsewhere (scales, zeros, quant states)."""
    checkpoint_bytes: int | None = None
    """Bytes of the tensors ``quantplug.save`` would write: the cross-check of ``model_bytes``."""
    quantize_seconds: float | None = None
    converted: int | None = None
    left_full_precision: int | None = None
    """Layers a default config targets that the backend did not convert (kept in full precision:
    counted in ``weight_bytes`` at their full size, and named in the table's note)."""
    """Layers the backend quantized (the rest it left in full precision, with reasons in its report)."""
    quantize_peak_bytes: int | None = None
    """Peak resident memory while quantizing, above what the process held before (``PeakMemory``)."""
    perplexity: float | None = None
    output_rel_error: float | None = None
    """``||y_q - y|| / ||y||`` of the model's output (logits) against the unquantized model's."""
    output_cosine: float | None = None
    """Cosine similarity of the model's output (flattened) with the unquantized model's."""
    embedding_cosine: float | None = None
    """Encoders (``feature-extraction``): mean cosine of the pooled sentence embeddings with the
    unquantized model's (``encoder_quality``)."""
    recall_at_10: float | None = None
    """Encoders: mean share of each sentence's 10 nearest neighbours (by the unquantized
    embeddings) that this model's embeddings find too."""
    label_agreement: float | None = None
    """Classifiers (``sequence-classification``): share of sentences given the unquantized label."""
    collapsed: bool | None = None
    """Quality beyond usefulness (``recommendation.COLLAPSED``): never recommended, kept off the plot."""
    prefill_ms: float | None = None
    decode_ms: float | None = None
    prefill_spread: float | None = None
    """Half the range of the timing samples relative to their median (``timing``): differences
    between rows inside it are noise."""
    decode_spread: float | None = None
    error: str | None = None
    acceptable: bool | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    """Distinct warnings the backend raised while quantizing and running (each once)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the inputs -----------------------------------------------------------------------------------


def vocab_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "vocab_size", None)
    return int(n) if n else None


def max_positions(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 2048)


def is_causal_lm(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters
    return (
        "labels" in params
        and hasattr(model, "get_output_embeddings")
        and model.get_output_embeddings() is not None
    )


@dataclasses.dataclass
class Bench:
    """What each model is measured on, on ``device``."""

    device: torch.device
    causal: bool
    """A causal LM fed token ids: perplexity and decode latency are measured too."""
    eval_ids: torch.Tensor
    """Token ids for perplexity (empty when the caller gave inputs), without special tokens."""
    window: int
    prefix: tuple[int, ...]
    """Token ids before every perplexity window (the tokenizer's BOS), not scored: ``text_quality``."""
    probe: Any
    """Inputs whose output is compared with the unquantized model's."""
    prefill_in: Any
    warm: Any
    prompt: torch.Tensor
    decode_tokens: int
    repeats: int
    calibration: list[torch.Tensor] | None = None
    """Token-id batches for candidates that need calibration data: text disjoint from ``eval_ids``."""
    calibration_note: str = ""
    compile: bool = False
    """Measure every model through ``torch.compile`` (``compare(compile=True)``)."""
    task: str = "outputs"
    """What quality means (``encoder_quality.TASKS``)."""
    sentences: Any = None
    """``encoder_quality.SentenceBench`` for encoders and classifiers (None: not measured)."""


# -- measuring ------------------------------------------------------------------------------------


def measure(
    row: Row,
    model: nn.Module,
    bench: Bench,
    reference: torch.Tensor | None,
    say: Callable[[str], None] = lambda msg: None,
) -> torch.Tensor:
    """Fill ``row``'s quality figures for ``model`` (latency: ``timing.PairedTiming``); returns its
    output on the probe (the reference for the candidates when ``model`` is the unquantized one).
    ``say`` gets a line per perplexity window: a slow CPU is never silent for long."""
    dev = bench.device
    out = _output(model, bench.probe)
    if reference is not None:
        row.output_rel_error = ((out - reference).norm() / reference.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
        row.output_cosine = cosine.item()
    if bench.sentences is not None:
        for key, value in score(model, bench.sentences, bench.task).items():
            setattr(row, key, value)
    if bench.causal:
        n = windows(bench.eval_ids.numel(), bench.window, bench.prefix)
        row.perplexity = perplexity(
            model,
            bench.eval_ids,
            bench.window,
            dev,
            on_window=lambda i: say(f"    perplexity: window {i}/{n} of {bench.window} tokens"),
            prefix=bench.prefix,
        )
    return out


def _output(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = run_batch(model, inputs)
    if isinstance(out, torch.Tensor):
        return out.float()
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value.float()
    return out[0].float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds ``fn()`` takes on ``device`` (CUDA work synchronised on both sides)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _cache_kwarg(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_ms(model: nn.Module, prompt: torch.Tensor, steps: int, device: torch.device) -> float:
    """ms per new token over ``steps`` greedy steps with a KV cache (the prompt's prefill excluded)."""
    kw = _cache_kwarg(model)
    with torch.no_grad():
        res = model(prompt.unsqueeze(0).to(device), use_cache=True)
        cache = res.get("cache") if res.get("cache") is not None else res.get("past_key_values")
        nxt = res.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            res = model(nxt, use_cache=True, **{kw: cache})
            cache = res.get("cache") if res.get("cache") is not None else res.get("past_key_values")
            nxt = res.logits[:, -1:].argmax(-1)
        _sync(device)
    return (time.perf_counter() - t0) / steps * 1e3


# -- warnings -------------------------------------------------------------------------------------


class _WarningRecords(logging.Handler):
    def __init__(self, out: list[str]):
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Collect what backends warn while a candidate runs (``warnings.warn`` and logging records of
    WARNING and above), so a warning repeated on every forward is reported once, not printed
    hundreds of times over the progress lines."""
    out: list[str] = []
    handler = _WarningRecords(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield out
    finally:
        root.removeHandler(handler)
    out.extend(f"{w.category.__name__}: {w.message}" for w in caught)


# -- the machine ----------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and the versions a comparison ran with."""
    from . import backends

    libs = {
        "torch": torch.__version__,
        "transformers": installed_version("transformers"),
        "quantplug": __version__,
    }
    for b in backends():
        libs[b.plugin or b.name] = b.plugin_version or None
        libs.update(b.status.library_versions)
    hw = detect_hardware(str(device))
    name = hw.name or cpu_hardware().name or platform.processor() or platform.machine()
    return {
        "device": f"{device.type} ({name})",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": libs,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
