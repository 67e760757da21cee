"""``compare``: quantize a model with each candidate and measure, on this machine, what ``select``
can only predict: weight bytes, quality, quantize time, decode and prefill latency.

Every candidate runs on its own copy of the full-precision model; one that fails is reported with
its error and the run goes on. The recommendation reconciles ``select``'s ranking with the
measurements.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import gc
import inspect
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import QuantConfig
from .errors import ConfigError
from .selection import Selection, Spec, resolve, select
from .sizes import fmt_bytes

#: a candidate is "acceptable" when its perplexity (or, without one, its output error) is within this
#: fraction of the unquantized model's
DEFAULT_MAX_QUALITY_LOSS = 0.05


# -- candidates -----------------------------------------------------------------------------------


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


# -- the workload ---------------------------------------------------------------------------------


def default_text() -> str:
    """The Python docs' topic texts that ship with the standard library (``pydoc_data.topics``)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def _vocab_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "vocab_size", None)
    return int(n) if n else None


def _max_positions(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 2048)


def _is_causal_lm(model: nn.Module) -> bool:
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


def perplexity(model: nn.Module, ids: torch.Tensor, window: int, device: torch.device) -> float:
    """exp(mean next-token loss) over non-overlapping ``window``-token windows of ``ids``."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            loss = model(chunk, labels=chunk).loss.float().item()
            n = chunk.shape[1] - 1
            nll += loss * n
            count += n
    return math.exp(nll / count) if count else float("nan")


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    raise ConfigError(
        f"inputs must be a tensor or a dict of keyword arguments, got {type(inputs).__name__}", field="inputs"
    )


def _call(model: nn.Module, inputs: Any, **kwargs: Any) -> Any:
    return model(**inputs, **kwargs) if isinstance(inputs, dict) else model(inputs, **kwargs)


def _output(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = _call(model, inputs)
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


# -- results --------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class Comparison:
    rows: list[Row]
    """The unquantized baseline first, then each candidate in the order run."""
    selection: Selection | None
    recommendation: str
    recommended: str | None
    settings: dict[str, Any]
    environment: dict[str, Any]

    @property
    def baseline(self) -> Row:
        return self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "recommended": self.recommended,
            "recommendation": self.recommendation,
            "select_ranking": [c.label for c in self.selection.candidates] if self.selection else None,
            "settings": self.settings,
            "environment": self.environment,
        }

    def table(self) -> str:
        """A markdown table of the rows, then the recommendation."""
        base = self.baseline
        quality = "perplexity" if base.perplexity is not None else "output rel. error"
        head = (
            f"| candidate | select rank | weights | model | quantize s | {quality} | "
            f"prefill {self.settings['prefill_tokens'] or ''} tok ms | decode ms/token | note |"
        )
        lines = [head, "|" + "---|" * 9]
        for r in self.rows:
            if r.error:
                lines.append(
                    f"| {r.label} | {r.select_rank or '-'} | | | | | | | failed: {r.error.splitlines()[0][:160]} |"
                )
                continue
            if base.perplexity is not None and r.perplexity is not None:
                q = f"{r.perplexity:.2f}"
                if r is not base and base.perplexity:
                    q += f" ({(r.perplexity / base.perplexity - 1) * 100:+.1f}%)"
            else:
                q = f"{r.output_rel_error:.4f}" if r.output_rel_error is not None else "-"
            w = fmt_bytes(r.weight_bytes)
            if r is not base and r.weight_bytes and base.weight_bytes:
                w += f" ({base.weight_bytes / r.weight_bytes:.1f}x smaller)"
            note = "baseline" if r is base else ("" if r.acceptable else "quality loss over the limit")
            lines.append(
                f"| {r.label} | {r.select_rank or '-'} | {w} | {fmt_bytes(r.model_bytes)} | "
                f"{_f(r.quantize_seconds, 1)} | {q} | {_f(r.prefill_ms, 0)} | {_f(r.decode_ms, 1)} | {note} |"
            )
        return "\n".join(lines) + "\n\n" + self.recommendation

    def plot(self, path: str | os.PathLike) -> Path:
        """Weight bytes vs quality, one marker per backend, decode latency written by each point."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ConfigError(
                "plotting needs matplotlib: pip install 'quantplug[plot]' (or pip install matplotlib)",
                field="plot",
            ) from None
        base = self.baseline
        use_ppl = base.perplexity is not None
        fig, ax = plt.subplots(figsize=(8, 5.5))
        markers = "os^Dv<>pPX*h"
        backends = sorted({r.backend for r in self.rows[1:] if r.backend})
        colors = plt.get_cmap("tab10")
        for r in self.rows:
            if r.error or r.weight_bytes is None:
                continue
            y = r.perplexity if use_ppl else r.output_rel_error
            if y is None or not math.isfinite(y) or (not use_ppl and r.backend is None):
                continue
            if r.backend is None:
                style = {"marker": "*", "s": 140, "color": "black", "label": "unquantized"}
            else:
                i = backends.index(r.backend)
                style = {
                    "marker": markers[i % len(markers)],
                    "s": 60,
                    "color": colors(i % 10),
                    "label": r.backend,
                }
            ax.scatter(r.weight_bytes / 1e6, y, alpha=0.85, **style)
            name = r.label.split(":", 1)[-1] if r.backend else r.label
            lat = f"\n{r.decode_ms:.1f} ms/tok" if r.decode_ms is not None else ""
            ax.annotate(
                f"{name}{lat}",
                (r.weight_bytes / 1e6, y),
                fontsize=6.5,
                xytext=(4, 3),
                textcoords="offset points",
            )
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        ax.set_xlabel("weights of the quantized layers (MB)")
        ax.set_ylabel("perplexity (lower is better)" if use_ppl else "output relative error")
        ys = [r.perplexity for r in self.rows if not r.error and r.perplexity and math.isfinite(r.perplexity)]
        if use_ppl and ys and max(ys) / min(ys) > 10:  # a broken 2-bit preset next to the rest
            ax.set_yscale("log")
        ax.set_title(
            f"{self.settings.get('model', 'model')} on {self.environment.get('device', '')}", fontsize=9
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out


def to_markdown(result: Comparison) -> str:
    """The table, the recommendation, and how it was measured (settings, machine, versions)."""
    st, env = result.settings, result.environment
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"# quantplug compare: {st['model']} on {env['device']}",
        "",
        result.table(),
        "",
        f"- Date: {env['date']}",
        f"- Machine: {env['device']}, {env['cpu_count']} CPU cores (torch used {env['torch_threads']} threads), "
        f"{env['platform']}, Python {env['python']}",
        f"- Versions: {versions}",
        f"- Quality: {st['quality']}; text: {st['text']}, {st['tokens']} tokens in {st['window']}-token windows "
        f"({st['encoding']}).",
        f"- Latency: prefill = one forward over {st['prefill_tokens']} tokens; decode = ms per token over "
        f"{st['decode_tokens']} greedy tokens with a KV cache; medians of {st['repeats']}.",
        f"- Acceptable: quality loss within {st['max_quality_loss']:.0%}; recommendation for "
        f"priority={st['priority']}, workload={st['workload']}.",
    ]
    warned = [(r.label, w) for r in result.rows for w in r.warnings]
    if warned:
        lines.append(
            "- Warnings raised by backends: "
            + "; ".join(f"{lbl}: {w.splitlines()[0][:160]}" for lbl, w in warned)
        )
    return "\n".join(lines) + "\n"


def _f(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# -- the run --------------------------------------------------------------------------------------


def _load_model(path: Path, device: torch.device, dtype: torch.dtype | None) -> tuple[nn.Module, Any]:
    from .checkpoint import load

    model = load(path, device=device, dtype=dtype, progress=False)
    if getattr(model, "quantplug_info", None) is not None:
        raise ConfigError(
            f"{path} is already quantized with {model.quantplug_info.config.quant_method!r}: compare needs the "
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


def _environment(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    from .registry import backends

    libs = {"torch": torch.__version__, "transformers": v("transformers"), "quantplug": __version__}
    for b in backends():
        libs[b.plugin or b.name] = b.plugin_version or None
        libs.update(b.status.library_versions)
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        from .selection import _cpu_hardware

        name = _cpu_hardware(True).name or name
    return {
        "device": f"{device.type} ({name})",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": libs,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


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
    dtype: torch.dtype | None = None,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Quantize ``model`` with each candidate and measure each on this machine.

    ``model``: an ``nn.Module`` (moved to ``device`` and put in eval mode, otherwise untouched: each
    candidate quantizes a deep copy) or a full-precision checkpoint folder (its tokenizer is used
    when present). ``candidates``: ``"backend:preset"`` strings, configs or config dicts; None =
    every candidate ``select`` ranks for this device (``per_backend`` keeps each backend's best N,
    ``top`` the first N). ``text``: for the perplexity of a causal LM (default: the stdlib's
    ``pydoc_data`` topics); other models are scored by the relative error of their output against
    the unquantized model's, on ``inputs`` (a tensor or a dict of keyword arguments; default: token
    ids from the text, for models with a vocabulary). Latency: ``prefill_tokens`` in one forward
    (default 256 on CPU, 2048 on GPU) and ``decode_tokens`` new tokens one at a time with a KV
    cache; medians of ``repeats``. A candidate that fails is reported with its error, and the run
    goes on. Returns a ``Comparison`` (``table()``, ``to_dict()``, ``plot(path)``).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for name, value in (("top", top), ("per_backend", per_backend)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(
                f"{name} must be a positive integer or None, got {value!r}", field=name, value=value
            )
    for name, value, low in (
        ("tokens", tokens, 2),
        ("window", window, 2),
        ("decode_tokens", decode_tokens, 1),
        ("repeats", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}", field=name, value=value)
    if not (isinstance(max_quality_loss, (int, float)) and max_quality_loss >= 0):
        raise ConfigError(
            f"max_quality_loss must be a number >= 0, got {max_quality_loss!r}", field="max_quality_loss"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    model_name = "model"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{path} is not a model folder (no config.json)", field="model", value=str(path)
            )
        model_name = path.name
        say(f"loading {path} on {dev}")
        model, folder_tokenizer = _load_model(
            path, dev, dtype or (torch.bfloat16 if dev.type == "cuda" else None)
        )
        tokenizer = tokenizer or folder_tokenizer
    elif isinstance(model, nn.Module):
        model_name = type(model).__name__
        if getattr(model, "quantplug_info", None) is not None:
            raise ConfigError("this model is already quantized: pass the full-precision model", field="model")
        model = model.to(dev)
    else:
        raise ConfigError(
            f"model must be an nn.Module or a checkpoint folder, got {type(model).__name__}", field="model"
        )
    model.eval()

    selection = select(model, device=dev.type, workload=workload, priority=priority)
    if candidates is None:
        specs, taken = [], {}
        for c in selection.candidates:
            if per_backend is not None and taken.get(c.backend, 0) >= per_backend:
                continue
            taken[c.backend] = taken.get(c.backend, 0) + 1
            specs.append(Spec(c.label, c.config, c.rank))
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
    else:
        if isinstance(candidates, (str, QuantConfig)) or not isinstance(candidates, Iterable):
            candidates = [candidates]
        specs = [resolve(c) for c in candidates]
        ranks = {c.label: c.rank for c in selection.candidates}
        for s in specs:
            s.select_rank = ranks.get(s.label)
        if not specs:
            raise ConfigError(
                "candidates is empty; pass None to compare every installed backend", field="candidates"
            )

    causal = _is_causal_lm(model) and inputs is None
    prefill_n = min(prefill_tokens or (2048 if dev.type == "cuda" else 256), _max_positions(model))
    window = min(window, _max_positions(model))
    if inputs is None and not _vocab_size(model):
        raise ConfigError(
            f"{type(model).__name__} takes no token ids (no config.vocab_size): pass inputs= (a tensor or a dict "
            f"of keyword arguments) to measure its output error and latency",
            field="inputs",
        )
    if inputs is not None:
        ids, encoding = torch.zeros(0, dtype=torch.long), "inputs given by the caller"
    else:
        ids, encoding = encode(
            text if text is not None else default_text(),
            tokenizer,
            _vocab_size(model),
            max(tokens, prefill_n) + 1,
        )
    if inputs is None and ids.numel() < 2:
        raise ConfigError("the text gives fewer than 2 tokens; pass a longer text", field="text")
    eval_ids = ids[:tokens]
    if inputs is not None:
        probe = prefill_in = _to(inputs, dev)
        warm = prefill_in
    else:
        prefill_in = ids[:prefill_n].unsqueeze(0).to(dev)
        probe = ids[: min(window, ids.numel())].unsqueeze(0).to(dev)
        warm = prefill_in[:, :8]
    prompt = ids[:32]
    settings = {
        "model": model_name,
        "device": str(dev),
        "tokens": int(eval_ids.numel()),
        "window": window,
        "text": "custom" if text is not None else "pydoc_data.topics (Python stdlib)",
        "encoding": encoding,
        "prefill_tokens": int(prefill_in.shape[-1]) if isinstance(prefill_in, torch.Tensor) else None,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "workload": workload,
        "priority": priority,
        "max_quality_loss": max_quality_loss,
        "quality": "perplexity" if causal else "output relative error vs unquantized",
    }

    def measure(row: Row, m: nn.Module, reference: torch.Tensor | None) -> torch.Tensor:
        out = _output(m, probe)
        if reference is not None:
            row.output_rel_error = ((out - reference).norm() / reference.norm()).item()
        if causal:
            row.perplexity = perplexity(m, eval_ids, window, dev)
        with torch.no_grad():
            _call(m, warm)  # warm-up: first calls pick kernels and allocate
            row.prefill_ms = statistics.median(
                _timed(lambda: _call(m, prefill_in, use_cache=False) if causal else _call(m, prefill_in), dev)
                for _ in range(repeats)
            )
        if causal:
            row.decode_ms = statistics.median(
                decode_ms(m, prompt, decode_tokens, dev) for _ in range(repeats)
            )
        return out

    baseline = Row("unquantized", None, None)
    from .convert import default_targets

    baseline.weight_bytes = sum(m.weight.numel() * m.weight.element_size() for _, m in default_targets(model))
    baseline.model_bytes = model_bytes(model)
    say(
        f"[0/{len(specs)}] unquantized ({str(next(model.parameters()).dtype).replace('torch.', '')}): measuring"
    )
    reference = measure(baseline, model, None)
    say(f"    {_summary(baseline)}")
    rows = [baseline]
    for i, spec in enumerate(specs, 1):
        row = Row(spec.label, spec.config.quant_method, spec.config.to_dict(), spec.select_rank)
        rows.append(row)
        say(f"[{i}/{len(specs)}] {spec.label}: quantizing")
        work = None
        try:
            from .convert import quantize

            with _captured_warnings() as caught:
                work = copy.deepcopy(model)
                report = quantize(work, spec.config, device=dev, progress=False)
                row.quantize_seconds = report.seconds
                row.weight_bytes = report.bytes_after
                row.model_bytes = model_bytes(work)
                measure(row, work, reference)
            row.warnings = list(dict.fromkeys(caught))
            say(f"    {_summary(row)}")
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
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    _judge(rows, max_quality_loss)
    recommended, text_out = _recommend(rows, selection, priority, workload, max_quality_loss)
    return Comparison(rows, selection, text_out, recommended, settings, _environment(dev))


class _WarningRecords(logging.Handler):
    def __init__(self, out: list[str]):
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
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


def _summary(row: Row) -> str:
    parts = []
    if row.quantize_seconds is not None:
        parts.append(f"quantized in {row.quantize_seconds:.1f} s")
    parts.append(f"weights {fmt_bytes(row.weight_bytes)}")
    if row.perplexity is not None:
        parts.append(f"perplexity {row.perplexity:.2f}")
    if row.output_rel_error is not None:
        parts.append(f"output error {row.output_rel_error:.4f}")
    if row.prefill_ms is not None:
        parts.append(f"prefill {row.prefill_ms:.0f} ms")
    if row.decode_ms is not None:
        parts.append(f"decode {row.decode_ms:.1f} ms/token")
    return ", ".join(parts)


def _loss(row: Row, base: Row) -> float | None:
    """Relative quality loss vs the baseline: perplexity increase, or output error."""
    if base.perplexity is not None and row.perplexity is not None:
        if not math.isfinite(row.perplexity):
            return math.inf
        return row.perplexity / base.perplexity - 1
    return row.output_rel_error


def _judge(rows: list[Row], limit: float) -> None:
    base = rows[0]
    base.acceptable = True
    for r in rows[1:]:
        loss = None if r.error else _loss(r, base)
        r.acceptable = loss is not None and loss <= limit


def _latency(row: Row, workload: str) -> float | None:
    if workload == "prefill":
        return row.prefill_ms
    if workload == "mixed" and row.prefill_ms and row.decode_ms:
        return math.sqrt(row.prefill_ms * row.decode_ms)
    return row.decode_ms if row.decode_ms is not None else row.prefill_ms


def _recommend(
    rows: list[Row], selection: Selection | None, priority: str, workload: str, limit: float
) -> tuple[str | None, str]:
    base, cands = rows[0], [r for r in rows[1:] if not r.error]
    failed = [r for r in rows[1:] if r.error]
    lines = []
    ok = [r for r in cands if r.acceptable]
    measure = "perplexity" if base.perplexity is not None else "output error"
    if not ok:
        best = min(cands, key=lambda r: _loss(r, base) or math.inf, default=None)
        lines.append(
            f"No candidate keeps its quality loss within {limit:.0%} ({measure}) of the unquantized model"
            + (f"; the closest is {best.label}." if best else ".")
            + " Stay unquantized, or loosen max_quality_loss."
        )
        pick = None
    else:
        if priority == "quality":
            key = lambda r: (_loss(r, base), r.weight_bytes or 0)  # noqa: E731
            basis = f"the lowest {measure}"
        elif priority == "speed":
            key = lambda r: (_latency(r, workload) or math.inf, r.weight_bytes or 0)  # noqa: E731
            basis = f"the fastest at {workload}"
        elif priority == "size":
            key = lambda r: (r.weight_bytes or 0, _loss(r, base))  # noqa: E731
            basis = "the smallest"
        else:
            key = lambda r: (  # noqa: E731
                math.log(max(r.weight_bytes or 1, 1)) + math.log(_latency(r, workload) or 1.0)
            )
            basis = f"the best size x {workload} latency"
        pick = min(ok, key=key)
        base_lat, lat = _latency(base, workload), _latency(pick, workload)
        speed = ""
        if base_lat and lat:
            speed = (
                f", {base_lat / lat:.2f}x the unquantized speed at {workload}"
                if lat < base_lat
                else f", {lat / base_lat:.2f}x slower than unquantized at {workload}"
            )
        lines.append(
            f"Recommended: **{pick.label}**: {basis} of the {len(ok)} candidate(s) within {limit:.0%} "
            f"{measure} loss ({fmt_bytes(pick.weight_bytes)} of weights, "
            f"{base.weight_bytes / pick.weight_bytes:.1f}x smaller{speed})."
            if pick.weight_bytes and base.weight_bytes
            else f"Recommended: **{pick.label}** ({basis})."
        )
        if base_lat and all((_latency(r, workload) or math.inf) > base_lat for r in ok):
            lines.append(
                f"Every candidate within the quality limit is slower than the unquantized model at {workload} "
                f"here: on this machine they buy memory, not speed."
            )
        faster = [
            r
            for r in cands
            if not r.acceptable and base_lat and (_latency(r, workload) or math.inf) < base_lat
        ]
        if faster:
            quick = min(faster, key=lambda r: _latency(r, workload))
            lines.append(
                f"{quick.label} is faster than unquantized at {workload} ({_latency(quick, workload):.3g} vs "
                f"{base_lat:.3g} ms) but loses {(_loss(quick, base) or 0):.1%} {measure}: over the limit."
            )
    if selection is not None and selection.candidates:
        measured = {r.label for r in cands}
        predicted = next((c for c in selection.candidates if c.label in measured), None)
        if predicted is not None and pick is not None:
            if predicted.label == pick.label:
                lines.append(f"`select` ranked it first too (priority={priority}, workload={workload}).")
            else:
                row = next(r for r in cands if r.label == predicted.label)
                if not row.acceptable:
                    why = f"its quality loss is over the {limit:.0%} limit on this model"
                else:
                    why = f"{pick.label} measured better for priority={priority} here"
                lines.append(
                    f"`select` ranked {predicted.label} highest of these (from the plugins' declared figures); measured, {why}."
                )
    if failed:
        lines.append(
            "Failed: " + "; ".join(f"{r.label} ({r.error.splitlines()[0][:120]})" for r in failed) + "."
        )
    return (pick.label if pick else None), "\n".join(lines)
