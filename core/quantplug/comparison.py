"""``compare``: quantize a model with each candidate and measure, on this machine, what ``select``
can only predict: weight bytes, quality, quantize time, decode and prefill latency.

Every candidate runs on its own copy of the full-precision model; one that fails is reported with
its error and the run goes on. The recommendation reconciles ``select``'s ranking with the
measurements.

``compare`` runs three steps: prepare (the model, the candidates and the inputs), measure (the
unquantized baseline, then each candidate: ``measure``) and recommend (``recommendation``). Tables,
reports and plots are rendered by ``report``; the names tests and scripts import from here
(``default_text``, ``perplexity``, ``to_markdown``, ...) are re-exported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .candidates import Spec, resolve
from .compare_settings import (
    check_arguments,
    check_run_arguments,
    dtype_note,
    other_dtypes_for,
    run_settings,
    threads_note,
    with_sentences,
)
from .config import QuantConfig
from .devices import to_device
from .dispatch import backends
from .encoder_quality import pooling_of
from .errors import ConfigError
from .footprint import model_bytes
from .machine_load import LoadMonitor, free_cores, others_busy
from .measure import (
    Bench,
    Row,
    decode_ms,
    environment,
    is_causal_lm,
    max_positions,
    vocab_size,
)
from .recommendation import judge, recommend
from .report import Comparison, to_markdown
from .runs import import_libraries, measure_all
from .selection import Selection, select
from .text_quality import default_text, encode, framing, perplexity
from .walk import quantized_info

__all__ = [
    "DEFAULT_MAX_QUALITY_LOSS",
    "Comparison",
    "Row",
    "compare",
    "decode_ms",
    "default_text",
    "encode",
    "model_bytes",
    "perplexity",
    "to_markdown",
]

#: a candidate is "acceptable" when its perplexity (or, without one, its output error) is within this
#: fraction of the unquantized model's
DEFAULT_MAX_QUALITY_LOSS = 0.05


def compare(
    model: nn.Module | str | os.PathLike,
    candidates: Sequence[Any] | None = None,
    *,
    text: str | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    inputs: Any = None,
    tokens: int = 2048,
    window: int = 512,
    prefill_tokens: int | None = None,
    decode_tokens: int = 16,
    repeats: int = 3,
    top: int | None = None,
    per_backend: int | None = None,
    workload: str = "decode",
    priority: str = "balanced",
    max_quality_loss: float = DEFAULT_MAX_QUALITY_LOSS,
    dtype: torch.dtype | str | None = None,
    calibration_tokens: int = 2048,
    threads: int | None = None,
    task: str | None = None,
    log: Callable[[str], None] | None = None,
    compile: bool = False,
) -> Comparison:
    """Quantize ``model`` with each candidate and measure each on this machine.

    ``model``: an ``nn.Module`` (moved to ``device``, put in eval mode; each candidate quantizes a
    deep copy) or a full-precision checkpoint folder (with its tokenizer when present).
    ``candidates``: ``"backend:preset"`` strings, configs or config dicts; None = what ``select``
    ranks for this device (``per_backend`` keeps each backend's best N, ``top`` the first N).
    ``task`` (default: from the model's class, ``encoder_quality.TASKS``) says what quality means:
    perplexity on ``text`` (default: the stdlib's ``pydoc_data`` topics) for causal LMs; for base
    models (``BertModel``) the cosine of pooled sentence embeddings on sentences of the text and
    recall@10 of the unquantized model's neighbours; label agreement for classifiers; else
    (``"outputs"``) the output's relative error on ``inputs`` (a tensor or a dict of keyword
    arguments; default: token ids of the text). Latency: ``prefill_tokens`` in one forward (default
    256 on CPU, 2048 on GPU) and ``decode_tokens`` new tokens with a KV cache, in ``repeats`` rounds.
    Candidates that need calibration data get ``calibration_tokens`` tokens of the text after the
    evaluated ones (none with ``inputs=``). A failing candidate is reported, and the run goes on.
    ``dtype`` None: the model in its own dtype (a folder: float32 on CPU, bfloat16 on CUDA), a
    bfloat16 copy next to it where the device computes in bfloat16, each candidate in its preset's
    ``dtype``; a dtype runs everything in it (an ``nn.Module`` is converted in place). ``threads``
    (default on CPU: the cores other processes leave free); other processes' CPU use during the run
    is measured and unreliable latency flagged. ``compile``: all measured through ``torch.compile``.
    Returns a ``Comparison`` (``table()``, ``to_dict()``, ``plot(path)``).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_arguments(top, per_backend, tokens, window, decode_tokens, repeats, max_quality_loss)
    forced = check_run_arguments(calibration_tokens, dtype, threads, task)
    # prepare: named candidates are resolved first, so a typo fails before the model is loaded
    given = _given_specs(candidates)
    # plugins load before the model: loading imports Transformers, which imports backend libraries
    # (torchao) that plugins prepare first (quantplug-torchao quiets torchao's import)
    backends()
    dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    busy = others_busy(1.0) if dev.type == "cpu" and threads is None else None  # before our own load
    pooling = pooling_of(model if isinstance(model, (str, os.PathLike)) else None)
    model, tokenizer, model_name = _prepare_model(model, dev, forced, tokenizer, say)
    can_calibrate = inputs is None and calibration_tokens > 0
    selection = select(
        model, device=dev.type, workload=workload, priority=priority, calibration_data=can_calibrate
    )
    specs = _specs(given, selection, top, per_backend, forced is not None)
    other_dtypes = other_dtypes_for(model, dev, forced)
    bench, encoding = _bench(
        model, dev, text, tokenizer, inputs, tokens, window, prefill_tokens, decode_tokens, repeats,
        calibration_tokens if can_calibrate else 0,
    )  # fmt: skip
    with_sentences(bench, model, task, text, tokenizer, inputs, pooling)
    settings = run_settings(model_name, dev, bench, text, encoding, workload, priority, max_quality_loss)
    settings["compile"] = bench.compile = compile
    settings["dtype"] = dtype_note(forced, other_dtypes, dev)
    # measure
    on_import = import_libraries(specs, say)
    rows, env = _measure_on_free_cores(model, specs, bench, other_dtypes, threads, busy, settings, say)
    # recommend
    judge(rows, max_quality_loss)
    recommended, text_out = recommend(rows, selection, priority, workload, max_quality_loss)
    return Comparison(rows, selection, text_out, recommended, settings, env, on_import)


def _measure_on_free_cores(
    model: nn.Module,
    specs: list[Spec],
    bench: Bench,
    other_dtypes: tuple[torch.dtype, ...],
    threads: int | None,
    busy: float | None,
    settings: dict[str, Any],
    say: Callable[[str], None],
) -> tuple[list[Row], dict[str, Any]]:
    """``measure_all`` with torch's threads on the cores other processes left free (or ``threads``),
    watching what other processes take meanwhile; the rows, and the environment with both."""
    dev = bench.device
    old_threads, monitor = torch.get_num_threads(), LoadMonitor()
    n_threads = threads or (free_cores(busy) if dev.type == "cpu" else old_threads)
    settings["threads"] = threads_note(n_threads, threads, busy)
    say(f"torch threads: {settings['threads']}")
    torch.set_num_threads(n_threads)
    monitor.start(busy)
    try:
        rows = measure_all(model, specs, bench, say, other_dtypes)
    finally:
        monitor.stop()
        torch.set_num_threads(old_threads)
    env = environment(dev)
    env["torch_threads"], env["load"] = n_threads, monitor.to_dict()
    return rows, env


# -- prepare --------------------------------------------------------------------------------------


def _prepare_model(
    model: Any, dev: torch.device, dtype: torch.dtype | None, tokenizer: Any, say: Callable[[str], None]
) -> tuple[nn.Module, Any, str]:
    """The full-precision model on ``dev`` in eval mode, the tokenizer to use, and the model's name."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{path} is not a model folder (no config.json)", field="model", value=str(path)
            )
        say(f"loading {path} on {dev}")
        model, folder_tokenizer = _load_model(
            path, dev, dtype or (torch.bfloat16 if dev.type == "cuda" else None)
        )
        name, tokenizer = path.name, tokenizer or folder_tokenizer
    elif isinstance(model, nn.Module):
        name = type(model).__name__
        if quantized_info(model) is not None:
            raise ConfigError("this model is already quantized: pass the full-precision model", field="model")
        model = model.to(dev)
        if dtype is not None:
            from .runs import to_dtype

            model = to_dtype(model, dtype)
    else:
        raise ConfigError(
            f"model must be an nn.Module or a checkpoint folder, got {type(model).__name__}", field="model"
        )
    model.eval()
    return model, tokenizer, name


def _load_model(path: Path, device: torch.device, dtype: torch.dtype | None) -> tuple[nn.Module, Any]:
    from .loading import load

    model = load(path, device=device, dtype=dtype, progress=False)
    info = quantized_info(model)
    if info is not None:
        raise ConfigError(
            f"{path} is already quantized with {info.config.quant_method!r}: compare needs the "
            f"full-precision model to quantize each candidate from",
            field="model",
        )
    tokenizer = None
    if any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # a broken tokenizer must not stop the measurement
            print(f"warning: could not load the tokenizer in {path} ({exc}); using bytes", file=sys.stderr)
    return model, tokenizer


def _given_specs(candidates: Any) -> list[Spec] | None:
    """The candidates the caller named, resolved (``None``: let ``select`` choose)."""
    if candidates is None:
        return None
    if isinstance(candidates, (str, QuantConfig)) or not isinstance(candidates, Iterable):
        candidates = [candidates]
    specs = [resolve(c) for c in candidates]
    if not specs:
        raise ConfigError(
            "candidates is empty; pass None to compare every installed backend", field="candidates"
        )
    return specs


def _specs(
    given: list[Spec] | None,
    selection: Selection,
    top: int | None,
    per_backend: int | None,
    one_dtype: bool = False,
) -> list[Spec]:
    """The candidates to measure: the given ones (with select's ranks), or ``select``'s
    (``per_backend`` then ``top``); with ``one_dtype``, none in a dtype of its own."""
    specs = _chosen_specs(given, selection, top, per_backend)
    for spec in specs if one_dtype else ():
        spec.dtype = None
    return specs


def _chosen_specs(
    given: list[Spec] | None, selection: Selection, top: int | None, per_backend: int | None
) -> list[Spec]:
    if given is None:
        specs, taken = [], {}
        for c in selection.candidates:
            if per_backend is not None and taken.get(c.backend, 0) >= per_backend:
                continue
            taken[c.backend] = taken.get(c.backend, 0) + 1
            specs.append(Spec(c.label, c.config, c.rank, c.dtype))
        if top is not None:
            specs = specs[:top]
        if not specs:
            raise ConfigError(
                "no candidate to compare: select rejected every installed backend for this device:\n"
                + "\n".join(
                    f"  {r.backend}{':' + r.preset if r.preset else ''}: {r.reason}"
                    for r in selection.rejected
                ),
                field="candidates",
            )
        return specs
    ranks = {c.label: c.rank for c in selection.candidates}
    for spec in given:
        spec.select_rank = ranks.get(spec.label)
    return given


def _bench(
    model: nn.Module,
    dev: torch.device,
    text: str | None,
    tokenizer: Any,
    inputs: Any,
    tokens: int,
    window: int,
    prefill_tokens: int | None,
    decode_tokens: int,
    repeats: int,
    calibration_tokens: int = 0,
) -> tuple[Bench, str]:
    """What every model is measured on (token ids from ``text``, or the caller's ``inputs``), and how
    the ids were made; calibration batches come from the text after every token the run scores or
    times."""
    causal = is_causal_lm(model) and inputs is None
    prefill_n = min(prefill_tokens or (2048 if dev.type == "cuda" else 256), max_positions(model))
    window = min(window, max_positions(model))
    if inputs is None and not vocab_size(model):
        raise ConfigError(
            f"{type(model).__name__} takes no token ids (no config.vocab_size): pass inputs= (a tensor or a dict "
            f"of keyword arguments) to measure its output error and latency",
            field="inputs",
        )
    calibration = None
    if inputs is not None:
        ids, encoding = torch.zeros(0, dtype=torch.long), "inputs given by the caller"
    else:
        source = text if text is not None else default_text()
        used = max(tokens, prefill_n) + 1
        ids, encoding = encode(source, tokenizer, vocab_size(model), used + calibration_tokens)
        ids, calibration = ids[:used], calibration_batches(ids[used:], window)
    if inputs is None and ids.numel() < 2:
        raise ConfigError("the text gives fewer than 2 tokens; pass a longer text", field="text")
    if inputs is not None:
        probe = prefill_in = to_device(inputs, dev)
        warm = prefill_in
    else:
        prefill_in = ids[:prefill_n].unsqueeze(0).to(dev)
        probe = ids[: min(window, ids.numel())].unsqueeze(0).to(dev)
        warm = prefill_in[:, :8]
    frame = framing(tokenizer if inputs is None else None)
    if causal and len(frame.prefix) >= window:
        raise ConfigError(f"window {window} leaves no room for text after the BOS", field="window")
    if causal:  # one window when the text is shorter: the report then states the true window
        window = min(window, len(frame.prefix) + max(2, min(tokens, ids.numel())))
    bench = Bench(
        dev,
        causal,
        ids[:tokens],
        window,
        frame.prefix if causal else (),
        probe,
        prefill_in,
        warm,
        ids[:32],
        decode_tokens,
        repeats,
        calibration=[b.to(dev) for b in calibration] if calibration else None,
        calibration_note=_calibration_note(calibration, ids.numel(), inputs is not None),
    )
    return bench, f"{encoding}; {frame.description}" if causal else encoding


def calibration_batches(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """``ids`` cut into [1, window] batches (the last, shorter one kept when it has 16 tokens or more)."""
    out = [ids[i : i + window].unsqueeze(0) for i in range(0, ids.numel(), window)]
    return [b for b in out if b.shape[-1] >= min(16, window)]


def _calibration_note(batches: list[torch.Tensor] | None, used: int, given_inputs: bool) -> str:
    if batches:
        n = sum(b.shape[-1] for b in batches)
        return (
            f"candidates that need calibration data got {n} tokens of the same text in {len(batches)} "
            f"batch(es): tokens {used}..{used + n - 1}, after the {used} tokens evaluated and timed (0..{used - 1})"
        )
    if given_inputs:
        return "none: with inputs= given there is no text to draw calibration data from"
    return "none (calibration_tokens=0, or the text ends before the evaluated tokens do)"
