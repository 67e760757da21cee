"""The text ``compare`` scores models on, how each window is framed, and perplexity.

A language model is trained on texts framed by its tokenizer: most causal LMs see a BOS token
first (Llama, Gemma, ...), some nothing. Scoring windows without the BOS a model expects inflates
its perplexity unevenly (Gemma-3 270M: 13.91 without, 11.82 with BOS on the first window) and lets
quantized candidates score better than the unquantized model. So each window starts with the
special tokens the tokenizer puts before a text (``framing``), which are context and not scored;
then every text token of the window is scored. Without a tokenizer (or one that adds nothing)
a window's first token is context only. ``Framing.description`` says which, for the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["Framing", "default_text", "encode", "framing", "perplexity"]


def default_text() -> str:
    """The Python docs' topic texts that ship with the standard library (``pydoc_data.topics``)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def encode(text: str, tokenizer: Any, vocab: int | None, limit: int) -> tuple[torch.Tensor, str]:
    """Token ids of ``text`` without special tokens (at most ``limit``) and how they were made."""
    if tokenizer is not None:
        ids = tokenizer(text[: limit * 12], add_special_tokens=False, return_tensors="pt").input_ids[0]
        return ids[:limit], f"{type(tokenizer).__name__}"
    if not vocab:
        raise ConfigError(
            "the model has no tokenizer and no config.vocab_size: pass tokenizer=", field="tokenizer"
        )
    raw = torch.tensor(list(text.encode("utf-8")[:limit]), dtype=torch.long)
    return raw % vocab, f"no tokenizer: UTF-8 bytes modulo the vocabulary ({vocab})"


@dataclasses.dataclass(frozen=True)
class Framing:
    prefix: tuple[int, ...]
    """Token ids put before every window (the tokenizer's BOS), context only: never scored."""
    description: str


def framing(tokenizer: Any) -> Framing:
    """The special tokens ``tokenizer`` puts before a text (as its ``add_bos_token`` / post-processor
    settings say), found by encoding a probe with and without special tokens."""
    if tokenizer is None:
        return Framing((), "no tokenizer, so no BOS: each window's first token is context, the rest scored")
    probe = "The quick brown fox."
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    framed = list(tokenizer(probe, add_special_tokens=True).input_ids)
    prefix: list[int] = []
    for i in range(len(framed) - len(plain) + 1):
        if framed[i : i + len(plain)] == plain:
            prefix = framed[:i]
            break
    if not prefix:
        return Framing((), "the tokenizer adds no BOS: each window's first token is context, the rest scored")
    names = tokenizer.convert_ids_to_tokens(prefix)
    return Framing(
        tuple(int(i) for i in prefix),
        f"each window starts with the tokenizer's {' '.join(map(str, names))} (as it frames a text; "
        f"context, not scored), then every text token is scored",
    )


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    window: int,
    device: torch.device,
    on_window: Callable[[int], None] | None = None,
    prefix: tuple[int, ...] = (),
) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``window`` tokens: ``prefix`` (not
    scored) and then text tokens of ``ids``, all scored (without a prefix, a window's first token is
    context only). ``on_window(i)`` is called before window ``i`` (1-based)."""
    step = window - len(prefix)
    if step < 1:
        raise ConfigError(f"window {window} leaves no room for text after the BOS", field="window")
    head = torch.tensor(prefix, dtype=torch.long)
    nll, count = 0.0, 0
    with torch.no_grad():
        starts = range(0, ids.numel() - (0 if prefix else 1), step)
        for i, start in enumerate(starts, 1):
            text = ids[start : start + step]
            if text.numel() < (1 if prefix else 2):
                break
            if on_window is not None:
                on_window(i)
            chunk = torch.cat([head, text]).unsqueeze(0).to(device)
            labels = chunk.clone()
            labels[:, : len(prefix)] = -100  # the BOS is context: Transformers' shift scores the rest
            loss = model(chunk, labels=labels).loss.float().item()
            n = text.numel() if prefix else text.numel() - 1
            nll += loss * n
            count += n
    return math.exp(nll / count) if count else float("nan")


def windows(n_ids: int, window: int, prefix: tuple[int, ...] = ()) -> int:
    """How many windows ``perplexity`` scores over ``n_ids`` text tokens."""
    step = max(1, window - len(prefix))
    return max(1, -(-(n_ids - (0 if prefix else 1)) // step))
