"""``compare``'s result, ``Comparison``, and its rendering for people: a markdown table, a report
with how it was measured (``to_markdown``), a plot, and the one-line progress summary of a row.

Nothing here imports torch; the plot is drawn by ``plotting``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .recommendation import COLLAPSED_COSINE, COLLAPSED_PERPLEXITY_RATIO, quality_measure
from .sizes import fmt_bytes

if TYPE_CHECKING:
    from .measure import Row
    from .selection import Selection


@dataclasses.dataclass
class Comparison:
    """What ``compare`` returns: the measured rows, ``select``'s view, the recommendation, and how
    and where it was measured."""

    rows: list[Row]
    """The unquantized baseline first, then each candidate in the order run."""
    selection: Selection | None
    recommendation: str
    recommended: str | None
    settings: dict[str, Any]
    environment: dict[str, Any]
    import_warnings: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """What each backend's library warned when imported (once per process, before any candidate
    ran), by backend name; what a candidate's own run raised is in its row's ``warnings``."""

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
            "import_warnings": self.import_warnings,
        }

    def table(self) -> str:
        """A markdown table of the rows, then the recommendation."""
        return _table(self)

    def write(self, folder: str | os.PathLike) -> None:
        """Write ``comparison.json`` (``to_dict``) and ``comparison.md`` (``to_markdown``) into ``folder``."""
        import json

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        (out / "comparison.md").write_text(to_markdown(self))

    def plot(self, path: str | os.PathLike) -> Path:
        """Weight bytes vs quality, one marker per backend, decode latency written by each point."""
        from .plotting import plot

        return plot(self, path)


def _table(result: Comparison) -> str:
    """A markdown table of the rows, then the recommendation."""
    base = result.baseline
    quality = {"embedding cosine": "embedding cosine (recall@10)"}.get(
        quality_measure(base), quality_measure(base)
    )
    quality = quality.replace("output error", "output rel. error")
    head = (
        f"| candidate | dtype | kernel | select rank | weights | model | quantize s | {quality} | "
        f"prefill {result.settings['prefill_tokens'] or ''} tok ms | decode ms/token"
        f"{' (compiled)' if result.settings.get('compile') else ''} | note |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in result.rows:
        if r.error:
            lines.append(
                f"| {r.label} | {r.dtype or ''} | | {r.select_rank or '-'} | | | | | | | "
                f"failed: {r.error.splitlines()[0][:160]} |"
            )
            continue
        if r.collapsed:
            q = f"collapsed ({r.perplexity:.3g})" if r.perplexity is not None else "collapsed"
        elif base.embedding_cosine is not None:
            q = f"{_f(r.embedding_cosine, 4)} ({_f(r.recall_at_10, 2)})"
        elif base.label_agreement is not None:
            q = _f(r.label_agreement, 3)
        elif base.perplexity is not None and r.perplexity is not None:
            q = f"{r.perplexity:.2f}"
            if r is not base and base.perplexity:
                q += f" ({(r.perplexity / base.perplexity - 1) * 100:+.1f}%)"
        else:
            q = f"{r.output_rel_error:.4f}" if r.output_rel_error is not None else "-"
        w = fmt_bytes(r.weight_bytes)
        if r is not base and r.weight_bytes and base.weight_bytes:
            w += f" ({base.weight_bytes / r.weight_bytes:.1f}x smaller)"
        note = "baseline" if r.backend is None else ("" if r.acceptable else "quality loss over the limit")
        if r.collapsed:
            note = "collapsed: quality beyond use"
        if r.left_full_precision:
            kept = f"{r.left_full_precision} of {r.left_full_precision + (r.converted or 0)} layers left unquantized"
            note = f"{note}; {kept}" if note else kept
        lines.append(
            f"| {r.label} | {r.dtype or '-'} | {r.kernel or '-'} | {r.select_rank or '-'} | {w} | "
            f"{fmt_bytes(r.model_bytes)} | "
            f"{_f(r.quantize_seconds, 1)} | {q} | {_f(r.prefill_ms, 0)}{_pm(r.prefill_spread)} | "
            f"{_f(r.decode_ms, 1)}{_pm(r.decode_spread)} | {note} |"
        )
    return "\n".join(lines) + "\n\n" + _load_warning(result) + result.recommendation


def _load_warning(result: Comparison) -> str:
    """A paragraph before the recommendation when other processes made the latency unreliable."""
    load = result.environment.get("load") or {}
    if not load.get("unreliable"):
        return ""
    return (
        f"**Latency figures unreliable**: other processes kept {load['other_processes_cores_during']:.1f} "
        f"core(s) busy during the run (of {result.environment.get('cpu_count')}); sizes and quality stand, "
        f"but rerun on an idle machine before trusting the speeds.\n\n"
    )


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
        f"- Threads: {st.get('threads', env['torch_threads'])}. {_load_line(env.get('load'))}",
        f"- Dtypes: {st.get('dtype', 'the model dtype')}.",
        f"- Quality: {st['quality']}; text: {st['text']}, {st['tokens']} tokens in {st['window']}-token windows "
        f"({st['encoding']}).",
        f"- Calibration: {st.get('calibration') or 'none'}.",
        f"- Latency: prefill = one forward over {st['prefill_tokens']} tokens; decode = ms per token over "
        f"{st['decode_tokens']} greedy tokens with a KV cache. Each candidate is timed in {st['repeats']} "
        f"round(s), each next to the unquantized model (which stays loaded), so load drifting during the run "
        f"cancels: its figure is the median ratio to the unquantized model times that model's median over "
        f"the whole run; ± is half the range of the ratios (for the unquantized model: of its own samples, "
        f"i.e. how much the machine drifted). Differences inside it are not ranked on.",
        f"- Acceptable: quality loss within {st['max_quality_loss']:.0%}; recommendation for "
        f"priority={st['priority']}, workload={st['workload']}.",
    ]
    lines += _size_lines(result)
    collapsed = [r.label for r in result.rows if r.collapsed]
    if collapsed:
        lines.append(
            f"- Collapsed (perplexity over {COLLAPSED_PERPLEXITY_RATIO:g}x the unquantized model's, or output cosine "
            f"under {COLLAPSED_COSINE:g}): {', '.join(collapsed)}; their figures are not comparable and the plot "
            f"leaves them out."
        )
    warned = [(r.label, w) for r in result.rows for w in r.warnings]
    if warned:
        lines.append("- Warnings raised by backends: " + "; ".join(f"{lbl}: {_clip(w)}" for lbl, w in warned))
    on_import = [(name, w) for name, ws in result.import_warnings.items() for w in ws]
    if on_import:
        lines.append(
            "- Warnings of backend libraries on import (not tied to a candidate): "
            + "; ".join(f"{name}: {_clip(w)}" for name, w in on_import)
        )
    return "\n".join(lines) + "\n"


def _load_line(load: dict[str, Any] | None) -> str:
    if not load or load.get("other_processes_cores_during") is None:
        return "Other processes' CPU use during the run: not measurable here."
    verdict = "unreliable latency" if load.get("unreliable") else "latency figures not disturbed"
    return (
        f"Other processes kept {load['other_processes_cores_during']:.2f} core(s) busy during the run "
        f"({load['measured_with']}; load average {load.get('loadavg_before')} before, "
        f"{load.get('loadavg_after')} after): {verdict}."
    )


def _size_lines(result: Comparison) -> list[str]:
    """What the size columns count, and any row whose in-memory count is below its checkpoint's
    (something the model holds went uncounted)."""
    lines = [
        "- Sizes: weights = the stored tensors of the layers each backend converted, plus the full-precision "
        "weights of the layers it left unquantized (the note counts them; the unquantized model's layers for the "
        "baselines); model = every tensor the loaded model holds (parameters, buffers and the "
        "tensors backends keep elsewhere); comparison.json also has each model's checkpoint bytes."
    ]
    short = [
        f"{r.label} ({fmt_bytes(r.model_bytes)} held vs {fmt_bytes(r.checkpoint_bytes)} in its checkpoint)"
        for r in result.rows
        if r.model_bytes is not None and r.checkpoint_bytes and r.model_bytes < 0.99 * r.checkpoint_bytes
    ]
    if short:
        lines.append("- Model sizes below the checkpoint's, so undercounted: " + "; ".join(short))
    return lines


def _clip(text: str, limit: int = 160) -> str:
    """The first line of ``text``, cut at a word boundary within ``limit`` characters (marked with
    an ellipsis), with a code span the cut opened closed again."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"
    return line + "`" if line.count("`") % 2 else line


def summary(row: Row) -> str:
    """One progress line: what was measured for ``row``."""
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


def _pm(spread: float | None) -> str:
    return f" ±{spread:.0%}" if spread is not None else ""


def _f(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
