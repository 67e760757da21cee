"""The layers ``bench_presets`` measures: weight shapes ``(out, in)`` from the user (or a model) and
the synthetic model made of them, capped so a run over every installed preset takes minutes."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

Shape = tuple[int, int]
"""A Linear layer's weight shape, ``(out_features, in_features)``, as torch stores it."""

#: SmolLM2-135M's (a small Llama) attention (576x576) and MLP (1536x576 up/gate, 576x1536 down)
DEFAULT_SHAPES: tuple[Shape, ...] = ((576, 576), (1536, 576), (576, 1536))

MAX_SHAPES = 4
"""Distinct shapes measured at most (the most frequent in the model)."""

#: Parameters the synthetic model aims for (its shapes repeated), per device type: beyond the CPU
#: caches, so decode reads weights from memory as a real model's does; and the most one set of
#: shapes may hold before the rarest are dropped or the largest halved.
TARGET_PARAMS = {"cpu": 24_000_000, "cuda": 400_000_000}
MAX_COPIES = 16


def _limits(device: str) -> tuple[int, int]:
    target = TARGET_PARAMS.get(device, TARGET_PARAMS["cpu"])
    return target, 2 * target


def parse_shapes(shapes: Sequence[Any] | None) -> dict[Shape, int]:
    """``[(out, in), ...]`` or ``["OUTxIN", ...]`` as shape counts; None: ``DEFAULT_SHAPES``."""
    if shapes is None:
        return dict.fromkeys(DEFAULT_SHAPES, 1)
    out: Counter[Shape] = Counter()
    for item in shapes:
        try:
            pair = item.lower().split("x") if isinstance(item, str) else list(item)
            o, i = (int(v) for v in pair)
        except (TypeError, ValueError):
            o = i = 0
        if o <= 0 or i <= 0:
            raise ConfigError(
                f"layer shape {item!r} is not OUTxIN (e.g. 1536x576) or (out, in) with positive sizes",
                field="shapes",
                value=str(item),
            )
        out[(o, i)] += 1
    if not out:
        raise ConfigError("no layer shape given", field="shapes", value=[])
    return dict(out)


def model_shapes(model: Any) -> dict[Shape, int]:
    """How often each weight shape occurs among the layers ``quantize`` converts by default in
    ``model``: an ``nn.Module``, or a model folder (or its config.json), built on the meta device."""
    from torch import nn

    from .layers import as_linear_meta, default_targets

    if not isinstance(model, nn.Module):
        model = _skeleton(Path(model))
    counts: Counter[Shape] = Counter()
    for _, module in default_targets(model):
        lin = as_linear_meta(module)
        counts[(lin.out_features, lin.in_features)] += 1
    if not counts:
        raise ConfigError("the model has no Linear layer quantize would convert", field="shapes")
    return dict(counts)


def _skeleton(path: Path) -> Any:
    import torch

    from .skeleton import skeleton

    folder = path.parent if path.name == "config.json" else path
    try:
        config_json = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{folder} is not a model folder with a readable config.json ({exc})",
            field="shapes",
            value=str(path),
        ) from None
    return skeleton(folder, config_json, None, torch.float32)


@dataclasses.dataclass
class SyntheticPlan:
    """The synthetic model: ``shapes`` repeated ``copies`` times, and what was capped."""

    shapes: list[Shape]
    copies: int
    notes: list[str]

    @property
    def params(self) -> int:
        return self.copies * sum(o * i for o, i in self.shapes)

    @property
    def labels(self) -> list[str]:
        return [f"{o}x{i}" for o, i in self.shapes]

    def describe(self) -> dict[str, Any]:
        return {"shapes": self.labels, "copies": self.copies, "params": self.params, "notes": self.notes}


def synthetic_plan(counts: dict[Shape, int], device: str) -> SyntheticPlan:
    """The most frequent shapes (``MAX_SHAPES``; the rarest dropped, or the largest halved, while
    one set holds over twice ``TARGET_PARAMS``), repeated up to ``TARGET_PARAMS``."""
    target, most = _limits(device)
    ordered = sorted(counts, key=lambda s: (-counts[s], -s[0] * s[1], s))
    shapes, notes = ordered[:MAX_SHAPES], []
    if len(ordered) > MAX_SHAPES:
        notes.append(f"{len(ordered) - MAX_SHAPES} rarer shape(s) left out: {_fmt(ordered[MAX_SHAPES:])}")
    while len(shapes) > 1 and _size(shapes) > most:
        notes.append(f"shape {_fmt([shapes[-1]])} left out to keep the run short")
        shapes = shapes[:-1]
    while _size(shapes) > most:
        (o, i) = shapes[0]
        if o < 256 or i < 256:
            break
        shapes = [(o // 2, i // 2)]
        notes.append(f"shape {o}x{i} halved to {o // 2}x{i // 2} to keep the run short")
    copies = max(1, min(MAX_COPIES, target // max(1, _size(shapes))))
    return SyntheticPlan(list(shapes), copies, notes)


def _size(shapes: Sequence[Shape]) -> int:
    return sum(o * i for o, i in shapes)


def _fmt(shapes: Sequence[Shape]) -> str:
    return ", ".join(f"{o}x{i}" for o, i in shapes)
