"""Quality of encoders as their users use them, for ``compare``: sentence embeddings (cosine with
the unquantized model's, and whether each sentence keeps its nearest neighbours) and classifier
labels, on real sentences of the text.

The relative error of an encoder's last hidden state says little about its embeddings: on
all-mpnet-base-v2 every 8-bit preset was "over the limit" by that measure (0.057-0.086) while the
pooled sentence embeddings kept cosine >= 0.999 with fp32. So ``compare`` scores

- ``feature-extraction`` models (a base model with no head, e.g. ``BertModel``): the mean cosine
  of pooled sentence embeddings with the unquantized model's, and recall@10 (the share of each
  sentence's 10 nearest neighbours among the sentences, by the unquantized embeddings, that the
  candidate's embeddings find too); pooling is the folder's own (sentence-transformers'
  ``1_Pooling/config.json``: mean, CLS or max) or else the attention-masked mean;
- ``sequence-classification`` models: the share of sentences given the unquantized model's label.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "TASKS",
    "SentenceBench",
    "check_task",
    "detect_task",
    "pooling_of",
    "score",
    "sentence_bench",
    "sentences",
]

TASKS = ("causal-lm", "feature-extraction", "sequence-classification", "outputs")
"""``compare``'s tasks: perplexity; sentence embeddings; labels; the output's relative error."""
NEIGHBOURS = 10


def check_task(task: Any) -> None:
    if task is not None and task not in TASKS:
        raise ConfigError(
            f"unknown task {task!r}; the tasks are {', '.join(TASKS)}",
            field="task",
            value=task,
            allowed=list(TASKS),
        )


def detect_task(model: nn.Module, causal: bool) -> str:
    """The task a model is measured for when none is given: from its class."""
    if causal:
        return "causal-lm"
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if getattr(model, "config", None) is not None and name.endswith("Model"):
        return "feature-extraction"  # a Transformers base model: its users pool its hidden states
    return "outputs"


def sentences(text: str, n: int) -> list[str]:
    """``n`` prose sentences spread over ``text`` (8 to 40 words, no code)."""
    pool = []
    for para in re.split(r"\n\s*\n", text):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
            if (
                8 <= len(s.split()) <= 40
                and s[:1].isupper()
                and s.endswith(".")
                and not re.search(r"[{}=>]|::", s)
            ):
                pool.append(s)
    pool = list(dict.fromkeys(pool))
    return pool[:: max(1, len(pool) // n)][:n]


def pooling_of(folder: str | Path | None) -> str:
    """The pooling a sentence-transformers folder declares (``1_Pooling/config.json``), else mean."""
    if folder is None:
        return "mean"
    config = Path(folder) / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return "mean"
    for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max")):
        if data.get(key):
            return mode
    return "mean"


@dataclasses.dataclass
class SentenceBench:
    """Sentences in batches of model inputs, and the unquantized model's result on them."""

    batches: list[dict[str, torch.Tensor]]
    count: int
    pooling: str
    encoding: str
    reference: torch.Tensor | None = None
    """Unquantized embeddings (normalized) or logits, filled by the baseline's measurement."""

    def describe(self, task: str) -> str:
        what = f"{self.pooling}-pooled sentence embeddings" if task == "feature-extraction" else "labels"
        return f"{what} of {self.count} sentences of the text ({self.encoding})"


def sentence_bench(
    text: str, tokenizer: Any, vocab: int | None, device: torch.device, pooling: str, n: int = 256
) -> SentenceBench:
    """``n`` sentences of ``text`` as padded batches of 32 (token ids and attention mask)."""
    chosen = sentences(text, n)
    if len(chosen) < NEIGHBOURS + 1:
        raise ConfigError(
            f"the text gives {len(chosen)} sentences; an encoder needs at least {NEIGHBOURS + 1}: pass a longer text",
            field="text",
        )
    batches = []
    for i in range(0, len(chosen), 32):
        part = chosen[i : i + 32]
        if tokenizer is not None:
            enc = tokenizer(part, padding=True, truncation=True, max_length=128, return_tensors="pt")
            batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        else:
            batch = _bytes_batch(part, vocab)
        batches.append({k: v.to(device) for k, v in batch.items()})
    encoding = (
        type(tokenizer).__name__ if tokenizer is not None else f"UTF-8 bytes modulo the vocabulary ({vocab})"
    )
    return SentenceBench(batches, len(chosen), pooling, encoding)


def _bytes_batch(part: list[str], vocab: int | None) -> dict[str, torch.Tensor]:
    if not vocab:
        raise ConfigError(
            "the model has no tokenizer and no config.vocab_size: pass tokenizer=", field="tokenizer"
        )
    rows = [list(s.encode("utf-8")[:128]) for s in part]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r) % vocab
        mask[j, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _outputs(model: nn.Module, sb: SentenceBench, task: str) -> torch.Tensor:
    """Normalized pooled embeddings [n, d] (feature extraction) or logits [n, labels], in float32."""
    out = []
    with torch.no_grad():
        for batch in sb.batches:
            res = model(**batch)
            if task == "sequence-classification":
                out.append(res.logits.float())
            else:
                hidden = res.last_hidden_state.float()
                out.append(
                    torch.nn.functional.normalize(_pool(hidden, batch["attention_mask"], sb.pooling), dim=-1)
                )
    return torch.cat(out)


def score(model: nn.Module, sb: SentenceBench, task: str) -> dict[str, float]:
    """The unquantized model (``sb.reference`` is None: it becomes the reference, scores perfect)
    or a candidate, scored against it: ``embedding_cosine`` and ``recall_at_10``, or
    ``label_agreement``."""
    got = _outputs(model, sb, task)
    if sb.reference is None:
        sb.reference = got
    ref = sb.reference
    if task == "sequence-classification":
        return {"label_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
    # float64 and clamped: float32 rounding can put a normalized dot product a hair over 1
    cosine = (got.double() * ref.double()).sum(-1).clamp(-1.0, 1.0).mean().item()
    return {"embedding_cosine": cosine, "recall_at_10": _recall(got, ref)}


def _recall(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean share of each sentence's nearest neighbours (by ``ref``, itself excluded) that ``got``
    finds among its own nearest neighbours."""
    k = min(NEIGHBOURS, ref.shape[0] - 1)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=-1).indices

    want, have = neighbours(ref), neighbours(got)
    hits = (want.unsqueeze(-1) == have.unsqueeze(-2)).any(-1).float().sum(-1)
    return (hits / k).mean().item()
