"""``compare``'s plot: weight bytes against quality, one marker per backend, each point labelled
with its decode latency where no other label or marker is. matplotlib is imported only here."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .measure import Row

__all__ = ["plot"]


def plot(result: Any, path: str | os.PathLike) -> Path:
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
    ax.set_ylabel("perplexity (lower is better)" if use_ppl else _y_label(result.baseline))
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
        y = r.perplexity if use_ppl else _y_value(r, rows[0])
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


def _y_value(row: Row, base: Row) -> float | None:
    """What the plot shows for a model scored without perplexity: its quality loss (lower is better)."""
    if base.embedding_cosine is not None or base.label_agreement is not None:
        value = row.embedding_cosine if base.embedding_cosine is not None else row.label_agreement
        return None if value is None else 1.0 - value
    return row.output_rel_error


def _y_label(base: Row) -> str:
    if base.embedding_cosine is not None:
        return "1 - embedding cosine (lower is better)"
    if base.label_agreement is not None:
        return "1 - label agreement (lower is better)"
    return "output relative error"


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
