"""How a Transformers MoE model's checkpoints name its experts, read from the model's own
conversion mapping (``transformers.conversion_mapping.get_model_conversion_mapping``), not copied.

Transformers 5 saves an MoE model in its original per-expert layout and converts it when loading:
``WeightRenaming``s (Mixtral: ``.block_sparse_moe.`` -> ``.mlp.``) and ``WeightConverter``s that
stack ``experts.*.w1.weight`` and ``experts.*.w3.weight`` into ``experts.gate_up_proj``. From those:

- ``projection_names(site)``: the per-expert (gate, up, down) names a converter reads for the
  experts module ``site`` (``w1``, ``w3``, ``w2``), and whether Transformers saves that site per
  expert at all (gpt-oss has no converter: it saves stacked);
- ``to_model(key)`` / ``to_checkpoint(key)``: a checkpoint key under the model's names and back,
  through the renamings (forward as Transformers loads, reversed as its ``save_pretrained`` writes).

For a model without a conversion mapping (or not a Transformers model) names are unchanged and
projections take ``DEFAULT_NAMES``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .experts import DEFAULT_NAMES

_SOURCE = re.compile(r"experts\.\*\.(\w+)\.weight$")


class CheckpointNames:
    def __init__(self, model: nn.Module):
        self.renamings: list[Any] = []
        self.reverse: list[Any] = []
        self.converters: list[Any] = []
        if not _is_transformers(model):
            return
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

        transforms = [
            t
            for t in get_model_conversion_mapping(model, add_legacy=False)
            if not isinstance(t, PrefixChange)
        ]
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.reverse = [t.reverse_transform() for t in self.renamings[::-1]]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def to_model(self, key: str) -> str:
        for renaming in self.renamings:
            key, _ = renaming.rename_source_key(key)
        return key

    def to_checkpoint(self, key: str) -> str:
        for renaming in self.reverse:
            key, _ = renaming.rename_source_key(key)
        return key

    def projection_names(self, site: str, has_gate: bool) -> tuple[tuple[str, str, str], bool]:
        """The (gate, up, down) per-expert names of experts module ``site``, and whether the
        model's conversion mapping stacks them (so Transformers saves them per expert)."""
        names: dict[str, str] = {}
        stored = self.to_checkpoint(site)
        for converter in self.converters:
            found = [m.group(1) for p in converter._original_source_patterns if (m := _SOURCE.search(p))]
            target = converter._original_target_patterns[0] if converter._original_target_patterns else ""
            if not found or not target.endswith(
                ("experts.gate_up_proj", "experts.up_proj", "experts.down_proj")
            ):
                continue
            renamed, pattern = converter.rename_source_key(self.to_model(f"{stored}.0.{found[0]}.weight"))
            if pattern is None or renamed != f"{site}.{target.rsplit('.', 1)[1]}":
                continue
            if target.endswith("down_proj"):
                names["down"] = found[0]
            elif has_gate and len(found) == 2:
                names["gate"], names["up"] = found
            elif not has_gate:
                names["up"] = found[0]
        if not has_gate:
            names.setdefault("gate", DEFAULT_NAMES[0])
        complete = len(names) == 3
        if not complete:
            names = dict(zip(("gate", "up", "down"), DEFAULT_NAMES, strict=True))
        return (names["gate"], names["up"], names["down"]), complete


def _is_transformers(model: nn.Module) -> bool:
    return any(
        c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
        for c in type(model).__mro__
    )
