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
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import __version__
from .devices import run_batch
from .errors import ConfigError
from .hardware import cpu_hardware, detect_hardware
from .versions import installed_version


@dataclasses.dataclass
class Row:
    label: str
    backend: str | None
    config: dict[str, Any] | None
    select_rank: int | None = None
    weight_bytes: int | None = None
    """Bytes of the layers quantize converted (full precision for the baseline row)."""
    model_bytes: int | None = None
    quantize_seconds: float | None = None
    perplexity: float | None = None
    output_rel_error: float | None = None
    """``||y_q - y|| / ||y||`` of the model's output (logits) against the unquantized model's."""
    prefill_ms: float | None = None
    decode_ms: float | None = None
    error: str | None = None
    acceptable: bool | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    """Distinct warnings the backend raised while quantizing and running (each once)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- sizes ----------------------------------------------------------------------------------------


def _plain_tensors(t: torch.Tensor):
    """``t``, or the plain tensors inside a wrapper tensor subclass (torchao's, which has no storage
    of its own), found through ``__tensor_flatten__``."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(t, name))
    else:
        yield t


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied embeddings)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for p in [*model.parameters(), *model.buffers()]:
        for t in _plain_tensors(p):
            if t.device.type == "meta":
                continue
            key = (t.device.type, t.untyped_storage().data_ptr())
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# -- the inputs -----------------------------------------------------------------------------------


def default_text() -> str:
    """The Python docs' topic texts that ship with the standard library (``pydoc_data.topics``)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


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


def encode(text: str, tokenizer: Any, vocab: int | None, limit: int) -> tuple[torch.Tensor, str]:
    """Token ids of ``text`` (at most ``limit``) and how they were made."""
    if tokenizer is not None:
        ids = tokenizer(text[: limit * 12], add_special_tokens=False, return_tensors="pt").input_ids[0]
        return ids[:limit], f"{type(tokenizer).__name__}"
    if not vocab:
        raise ConfigError(
            "the model has no tokenizer and no config.vocab_size: pass tokenizer=", field="tokenizer"
        )
    raw = torch.tensor(list(text.encode("utf-8")[:limit]), dtype=torch.long)
    return raw % vocab, f"no tokenizer: UTF-8 bytes modulo the vocabulary ({vocab})"


@dataclasses.dataclass
class Bench:
    """What each model is measured on, on ``device``."""

    device: torch.device
    causal: bool
    """A causal LM fed token ids: perplexity and decode latency are measured too."""
    eval_ids: torch.Tensor
    """Token ids for perplexity (empty when the caller gave inputs)."""
    window: int
    probe: Any
    """Inputs whose output is compared with the unquantized model's."""
    prefill_in: Any
    warm: Any
    prompt: torch.Tensor
    decode_tokens: int
    repeats: int


# -- measuring ------------------------------------------------------------------------------------


def measure(
    row: Row,
    model: nn.Module,
    bench: Bench,
    reference: torch.Tensor | None,
    say: Callable[[str], None] = lambda msg: None,
) -> torch.Tensor:
    """Fill ``row``'s quality and latency figures for ``model``; returns its output on the probe
    (the reference for the candidates when ``model`` is the unquantized one). ``say`` gets a line
    per step (each perplexity window, the latency runs): a slow CPU is never silent for long."""
    dev = bench.device
    out = _output(model, bench.probe)
    if reference is not None:
        row.output_rel_error = ((out - reference).norm() / reference.norm()).item()
    if bench.causal:
        windows = max(1, -(-(bench.eval_ids.numel() - 1) // bench.window))
        row.perplexity = perplexity(
            model,
            bench.eval_ids,
            bench.window,
            dev,
            on_window=lambda i: say(f"    perplexity: window {i}/{windows} of {bench.window} tokens"),
        )
    say(f"    latency: prefill and decode, {bench.repeats} run(s) each")
    with torch.no_grad():
        run_batch(model, bench.warm)  # warm-up: first calls pick kernels and allocate
        if bench.causal:
            prefill = lambda: run_batch(model, bench.prefill_in, use_cache=False)  # noqa: E731
        else:
            prefill = lambda: run_batch(model, bench.prefill_in)  # noqa: E731
        row.prefill_ms = statistics.median(_timed(prefill, dev) for _ in range(bench.repeats))
    if bench.causal:
        row.decode_ms = statistics.median(
            decode_ms(model, bench.prompt, bench.decode_tokens, dev) for _ in range(bench.repeats)
        )
    return out


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    window: int,
    device: torch.device,
    on_window: Callable[[int], None] | None = None,
) -> float:
    """exp(mean next-token loss) over non-overlapping ``window``-token windows of ``ids``;
    ``on_window(i)`` is called before window ``i`` (1-based)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i, start in enumerate(range(0, ids.numel() - 1, window), 1):
            chunk = ids[start : start + window].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            if on_window is not None:
                on_window(i)
            loss = model(chunk, labels=chunk).loss.float().item()
            n = chunk.shape[1] - 1
            nll += loss * n
            count += n
    return math.exp(nll / count) if count else float("nan")


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


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
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
