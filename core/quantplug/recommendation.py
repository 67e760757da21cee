"""``compare``'s last step: judge each measured row against the quality limit, pick the one to
recommend for the priority and workload, and say how that squares with ``select``'s ranking."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .sizes import fmt_bytes

if TYPE_CHECKING:
    from .measure import Row
    from .selection import Selection


#: A candidate is "collapsed" (beyond usefulness, whatever the limit) when its perplexity is over
#: this many times the unquantized model's, or its output's cosine with the unquantized output is
#: under COLLAPSED_COSINE (for models compared by output). Its figures are not comparable with the
#: others': the report says "collapsed" and the plot keeps it off the scale.
COLLAPSED_PERPLEXITY_RATIO = 10.0
COLLAPSED_COSINE = 0.5


def judge(rows: list[Row], limit: float) -> None:
    """Mark each candidate row acceptable when its quality loss is within ``limit``, and collapsed
    when its quality is beyond usefulness (``COLLAPSED_*``; never acceptable)."""
    base = rows[0]
    base.acceptable, base.collapsed = True, False
    for r in candidates(rows):
        loss = None if r.error else loss_of(r, base)
        r.collapsed = None if r.error else is_collapsed(r, base)
        r.acceptable = loss is not None and loss <= limit and not r.collapsed


def candidates(rows: list[Row]) -> list[Row]:
    """The quantized rows: every row but the unquantized baselines (the first row, and the same
    model in another dtype, ``backend`` None)."""
    return [r for r in rows[1:] if r.backend is not None]


def other_baselines(rows: list[Row]) -> list[Row]:
    """The unquantized model in other dtypes than the first row's (e.g. bfloat16 next to float32)."""
    return [r for r in rows[1:] if r.backend is None and not r.error]


def is_collapsed(row: Row, base: Row) -> bool:
    agreement = _agreement(row, base)
    if agreement is not None:  # sentence embeddings or labels
        return not agreement >= COLLAPSED_COSINE
    if base.perplexity is not None and row.perplexity is not None:
        return (
            not math.isfinite(row.perplexity) or row.perplexity > COLLAPSED_PERPLEXITY_RATIO * base.perplexity
        )
    return row.output_cosine is not None and not row.output_cosine >= COLLAPSED_COSINE


def loss_of(row: Row, base: Row) -> float | None:
    """Relative quality loss vs the baseline: perplexity increase; for encoders 1 - embedding
    cosine, for classifiers 1 - label agreement; else the output error."""
    agreement = _agreement(row, base)
    if agreement is not None:
        return 1.0 - agreement
    if base.perplexity is not None and row.perplexity is not None:
        if not math.isfinite(row.perplexity):
            return math.inf
        return row.perplexity / base.perplexity - 1
    return row.output_rel_error


def _agreement(row: Row, base: Row) -> float | None:
    """The encoder / classifier figure the quality is judged by (None: not such a model)."""
    for key in ("embedding_cosine", "label_agreement"):
        if getattr(base, key) is not None:
            value = getattr(row, key)
            return value if value is not None else float("nan")
    return None


def quality_measure(base: Row) -> str:
    """The name of what quality is judged by, for the recommendation's sentences."""
    if base.embedding_cosine is not None:
        return "embedding cosine"
    if base.label_agreement is not None:
        return "label agreement"
    return "perplexity" if base.perplexity is not None else "output error"


def latency(row: Row, workload: str) -> float | None:
    if workload == "prefill":
        return row.prefill_ms
    if workload == "mixed" and row.prefill_ms and row.decode_ms:
        return math.sqrt(row.prefill_ms * row.decode_ms)
    return row.decode_ms if row.decode_ms is not None else row.prefill_ms


def recommend(
    rows: list[Row], selection: Selection | None, priority: str, workload: str, limit: float
) -> tuple[str | None, str]:
    """The recommended label (None: stay unquantized) and the recommendation in words."""
    base, cands = rows[0], [r for r in candidates(rows) if not r.error]
    if base.decode_ms is None:  # not a causal LM: one forward is all there is to time
        workload = "prefill"
    failed = [r for r in candidates(rows) if r.error]
    ok = [r for r in cands if r.acceptable]
    measure = quality_measure(base)
    if not ok:
        best = min(cands, key=lambda r: loss_of(r, base) or math.inf, default=None)
        lines = [
            f"No candidate keeps its quality loss within {limit:.0%} ({measure}) of the unquantized model"
            + (f"; the closest is {best.label}." if best else ".")
            + " Stay unquantized, or loosen max_quality_loss."
        ]
        pick = None
    else:
        key, basis = _ranking(base, priority, workload, measure)
        pick = min(ok, key=key)
        tied = _within_noise(pick, ok, priority, workload) if priority in ("balanced", "speed") else [pick]
        if len(tied) > 1:  # the timing cannot tell them apart: the better quality wins
            pick = min(tied, key=lambda r: (loss_of(r, base), r.weight_bytes or 0))
        lines = _pick_lines(pick, base, cands, ok, basis, workload, limit, measure)
        lines += _versus_other_baselines(pick, rows, workload)
        if len(tied) > 1:
            lines.append(_noise_line(pick, tied, workload, measure))
    if selection is not None and selection.candidates and pick is not None:
        lines += _versus_select(pick, cands, selection, priority, workload, limit)
    if failed:
        lines.append(
            "Failed: " + "; ".join(f"{r.label} ({r.error.splitlines()[0][:120]})" for r in failed) + "."
        )
    return (pick.label if pick else None), "\n".join(lines)


def spread(row: Row, workload: str) -> float:
    """The relative timing spread of ``row``'s latency for ``workload`` (0 when unknown)."""
    parts = {"decode": [row.decode_spread], "prefill": [row.prefill_spread]}.get(
        workload, [row.decode_spread, row.prefill_spread]
    )
    return max((p for p in parts if p is not None), default=0.0)


def _within_noise(pick: Row, ok: list[Row], priority: str, workload: str) -> list[Row]:
    """``pick`` and the acceptable rows whose ranking key (log latency, plus log size when balanced)
    is worse than ``pick``'s by no more than both rows' timing spreads: measurement cannot order them."""

    def key(r: Row) -> float:
        lat = math.log(latency(r, workload) or 1.0)
        return lat if priority == "speed" else lat + math.log(max(r.weight_bytes or 1, 1))

    def noise(r: Row) -> float:
        return math.log1p(spread(r, workload))

    return [r for r in ok if r is pick or key(r) - key(pick) <= noise(r) + noise(pick)]


def _noise_line(pick: Row, tied: list[Row], workload: str, measure: str) -> str:
    others = [r for r in tied if r is not pick]
    return (
        f"{', '.join(r.label for r in others)} measured as good at {workload} within the timing spread "
        f"({', '.join(f'{r.label} ±{spread(r, workload):.0%}' for r in tied)}): too close to rank on speed, "
        f"so the lowest {measure} loss among them decides."
    )


def _ranking(base: Row, priority: str, workload: str, measure: str) -> tuple[Callable[[Row], Any], str]:
    """The sort key among acceptable rows for ``priority``, and its basis in words."""
    if priority == "quality":
        return (lambda r: (loss_of(r, base), r.weight_bytes or 0)), f"the lowest {measure}"
    if priority == "speed":
        return (
            lambda r: (latency(r, workload) or math.inf, r.weight_bytes or 0)
        ), f"the fastest at {workload}"
    if priority == "size":
        return (lambda r: (r.weight_bytes or 0, loss_of(r, base))), "the smallest"
    return (
        lambda r: math.log(max(r.weight_bytes or 1, 1)) + math.log(latency(r, workload) or 1.0)
    ), f"the best size x {workload} latency"


def _pick_lines(
    pick: Row,
    base: Row,
    cands: list[Row],
    ok: list[Row],
    basis: str,
    workload: str,
    limit: float,
    measure: str,
) -> list[str]:
    """The recommendation, and what it and the faster rejected candidates mean for speed."""
    base_lat, lat = latency(base, workload), latency(pick, workload)
    speed = ""
    if base_lat and lat:
        speed = (
            f", {base_lat / lat:.2f}x the unquantized speed at {workload}"
            if lat < base_lat
            else f", {lat / base_lat:.2f}x slower than unquantized at {workload}"
        )
    lines = [
        f"Recommended: **{pick.label}**: {basis} of the {len(ok)} candidate(s) within {limit:.0%} "
        f"{measure} loss ({fmt_bytes(pick.weight_bytes)} of weights, "
        f"{base.weight_bytes / pick.weight_bytes:.1f}x smaller{speed})."
        if pick.weight_bytes and base.weight_bytes
        else f"Recommended: **{pick.label}** ({basis})."
    ]
    if base_lat and all((latency(r, workload) or math.inf) > base_lat for r in ok):
        lines.append(
            f"Every candidate within the quality limit is slower than the unquantized model at {workload} "
            f"here: on this machine they buy memory, not speed."
        )
    faster = [
        r for r in cands if not r.acceptable and base_lat and (latency(r, workload) or math.inf) < base_lat
    ]
    if faster:
        quick = min(faster, key=lambda r: latency(r, workload))
        lines.append(
            f"{quick.label} is faster than unquantized at {workload} ({latency(quick, workload):.3g} vs "
            f"{base_lat:.3g} ms) but loses {(loss_of(quick, base) or 0):.1%} {measure}: over the limit."
        )
    return lines


def _versus_other_baselines(pick: Row, rows: list[Row], workload: str) -> list[str]:
    """The pick's speed against the unquantized model in the other dtypes measured (bfloat16)."""
    lat, out = latency(pick, workload), []
    for other in other_baselines(rows):
        other_lat = latency(other, workload)
        if lat and other_lat:
            ratio = f"{other_lat / lat:.2f}x faster" if lat < other_lat else f"{lat / other_lat:.2f}x slower"
            out.append(f"Against {other.label}: {ratio} at {workload} ({lat:.3g} vs {other_lat:.3g} ms).")
    return out


def _versus_select(
    pick: Row, cands: list[Row], selection: Selection, priority: str, workload: str, limit: float
) -> list[str]:
    """How ``select``'s highest-ranked measured candidate fared against the pick."""
    measured = {r.label for r in cands}
    predicted = next((c for c in selection.candidates if c.label in measured), None)
    if predicted is None:
        return []
    if predicted.label == pick.label:
        return [f"`select` ranked it first too (priority={priority}, workload={workload})."]
    row = next(r for r in cands if r.label == predicted.label)
    if not row.acceptable:
        why = f"its quality loss is over the {limit:.0%} limit on this model"
    else:
        why = f"{pick.label} measured better for priority={priority} here"
    return [
        f"`select` ranked {predicted.label} highest of these (from the plugins' declared figures); measured, {why}."
    ]
