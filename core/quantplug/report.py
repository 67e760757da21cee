"""``compare``'s result, ``Comparison``, and its rendering for people: a markdown table, a report
with how it was measured (``to_markdown``), a plot, and the one-line progress summary of a row.

Nothing here imports torch; matplotlib is imported only to plot.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .recommendation import COLLAPSED_COSINE, COLLAPSED_PERPLEXITY_RATIO
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
        return _plot(self, path)


def _table(result: Comparison) -> str:
    """A markdown table of the rows, then the recommendation."""
    base = result.baseline
    quality = "perplexity" if base.perplexity is not None else "output rel. error"
    head = (
        f"| candidate | dtype | select rank | weights | model | quantize s | {quality} | "
        f"prefill {result.settings['prefill_tokens'] or ''} tok ms | decode ms/token | note |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in result.rows:
        if r.error:
            lines.append(
                f"| {r.label} | {r.dtype or ''} | {r.select_rank or '-'} | | | | | | | "
                f"failed: {r.error.splitlines()[0][:160]} |"
            )
            continue
        if r.collapsed:
            q = f"collapsed ({r.perplexity:.3g})" if r.perplexity is not None else "collapsed"
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
            f"| {r.label} | {r.dtype or '-'} | {r.select_rank or '-'} | {w} | {fmt_bytes(r.model_bytes)} | "
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


def _plot(result: Comparison, path: str | os.PathLike) -> Path:
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
    use_ppl = result.baseline.perplexity is not None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    labels_at = _scatter(ax, plt.get_cmap("tab10"), result.rows, use_ppl)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.set_xlabel("weights of the quantized layers (MB)")
    ax.set_ylabel("perplexity (lower is better)" if use_ppl else "output relative error")
    collapsed = [r.label for r in result.rows if r.collapsed]
    if collapsed:
        ax.text(
            0.01, 0.01, "collapsed, not shown: " + ", ".join(collapsed), transform=ax.transAxes, fontsize=7
        )
    ys = [
        r.perplexity
        for r in result.rows
        if not r.error and not r.collapsed and r.perplexity and math.isfinite(r.perplexity)
    ]
    if use_ppl and ys and max(ys) / min(ys) > 10:  # a broken 2-bit preset next to the rest
        ax.set_yscale("log")
    _plain_ticks(ax)
    _place_labels(fig, ax, labels_at)
    ax.set_title(
        f"{result.settings.get('model', 'model')} on {result.environment.get('device', '')}", fontsize=9
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _scatter(ax, colors, rows: list[Row], use_ppl: bool) -> list[tuple[float, float, str]]:
    """One point per measured row (the unquantized model a star: black in its own dtype, grey in
    another); returns each point with its label (name and decode latency) for ``_place_labels``."""
    markers = "os^Dv<>pPX*h"
    backends = sorted({r.backend for r in rows[1:] if r.backend})
    labels = []
    for r in rows:
        if r.error or r.weight_bytes is None or r.collapsed:
            continue
        y = r.perplexity if use_ppl else r.output_rel_error
        if y is None or not math.isfinite(y) or (not use_ppl and r.backend is None):
            continue
        if r.backend is None:
            color = "black" if r is rows[0] else "grey"
            style = {"marker": "*", "s": 140, "color": color, "label": r.label}
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
        labels.append((r.weight_bytes / 1e6, y, f"{name}{lat}"))
    return labels


def _plain_ticks(ax) -> None:
    """Tick labels as plain numbers (15, 20, 30), not powers of ten, also on a log axis."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FormatStrFormatter("%g"))
    if ax.get_yscale() == "log":
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        lo, hi = ax.get_ylim()
        if hi / lo > 30:  # too many minor labels to read: keep the major ones
            ax.yaxis.set_minor_formatter(NullFormatter())


_FONT = 6.5


def _place_labels(fig, ax, labels: list[tuple[float, float, str]]) -> None:
    """Write each label where it overlaps no other label and no point, inside the axes, as near its
    point as that allows (the nearest free spot of a grid of offsets around it), with a leader line
    when it had to move away."""
    fig.canvas.draw()  # the final limits, so data -> points is right
    to_pt = 72.0 / fig.dpi
    frame = ax.get_window_extent()
    inside = (frame.x0 * to_pt, frame.y0 * to_pt, frame.x1 * to_pt, frame.y1 * to_pt)
    points = [tuple(v * to_pt for v in ax.transData.transform((x, y))) for x, y, _ in labels]
    taken = [(px - 6, py - 6, px + 6, py + 6) for px, py in points]  # the markers
    order = sorted(range(len(labels)), key=lambda i: (-labels[i][1], labels[i][0]))
    for i in order:
        x, y, text = labels[i]
        px, py = points[i]
        lines = text.split("\n")
        w, h = 0.55 * _FONT * max(len(line) for line in lines), 1.25 * _FONT * len(lines)
        others = taken  # every marker, its own too, and the labels placed so far
        best = None
        for dx, dy in _offsets(w, h):
            box = (px + dx, py + dy, px + dx + w, py + dy + h)
            if not _within(box, inside) or any(_overlap(box, o) for o in others):
                continue
            dist = _gap(box, px, py) + (0 if dx > 0 else 4)  # nearest first, the right side on ties
            if best is None or dist < best[0]:
                best = (dist, dx, dy, box)
        _, dx, dy, box = best or (0.0, 4.0, 3.0, (px + 4, py + 3, px + 4 + w, py + 3 + h))
        taken.append(box)
        far = _gap(box, px, py) > 8
        ax.annotate(
            text,
            (x, y),
            fontsize=_FONT,
            xytext=(dx, dy),
            textcoords="offset points",
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if far else None,
        )


def _offsets(w: float, h: float) -> list[tuple[float, float]]:
    """Candidate offsets (points, lower-left corner of the label from its point): a grid around the
    point, out to a few label sizes."""
    xs = (
        [4.0, -w - 4, -w / 2]
        + [4.0 + k * w / 2 for k in range(1, 9)]
        + [-w - 4 - k * w / 2 for k in range(1, 5)]
    )
    ys = (
        [3.0, -h - 3, -h / 2]
        + [3.0 + k * h / 2 for k in range(1, 9)]
        + [-h - 3 - k * h / 2 for k in range(1, 9)]
    )
    return [(dx, dy) for dx in xs for dy in ys]


def _within(box: tuple[float, float, float, float], frame: tuple[float, float, float, float]) -> bool:
    return box[0] >= frame[0] and box[1] >= frame[1] and box[2] <= frame[2] and box[3] <= frame[3]


def _gap(box: tuple[float, float, float, float], px: float, py: float) -> float:
    """Distance from a point to a box (0 inside)."""
    return math.hypot(max(box[0] - px, 0, px - box[2]), max(box[1] - py, 0, py - box[3]))


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
