"""How a checkpoint's tensor names meet the model's, as Transformers meets them: the ordinary
layouts of the field load, anything else that does not match stays an error naming it.

- **Base-model prefix, either way.** A head model (``BertForMaskedLM``, whose encoder is
  ``model.bert``) fed a checkpoint of its base model (keys without ``bert.``) reads them under the
  prefix; a base model fed a head model's checkpoint reads the ``bert.`` keys without it and leaves
  the head's tensors (outside the prefix) unread, once every tensor of the model is found.
- **A checkpoint holding only the base model** of the head class config.json names (the
  sentence-transformers layout: ``architectures: ["MPNetForMaskedLM"]``, weights of ``MPNetModel``):
  when quantplug builds the model itself, it loads the base model instead of leaving the head
  randomly initialised, and says so.
- **Buffers the model computes** (registered non-persistent, e.g. ``embeddings.position_ids``) that
  an older checkpoint stored are left unread.
"""

from __future__ import annotations

import logging

from torch import nn

from .checkpoint import Checkpoint

logger = logging.getLogger("quantplug")


def adapt(model: nn.Module, ckpt: Checkpoint, built_here: bool) -> nn.Module:
    """The model to fill (``model``, or its base model, see the module docstring) with ``ckpt``
    presenting its tensors under that model's names. ``built_here``: quantplug built ``model``
    from config.json (the caller did not pass one)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    have, keys, pre = ckpt.keys(), set(model.state_dict()), prefix + "."
    if isinstance(base, nn.Module) and base is not model and not any(k.startswith(pre) for k in have):
        if _mostly_found(set(base.state_dict()), have):
            head = {k for k in keys if not k.startswith(pre)}
            if built_here and not head & have:
                logger.warning(
                    "quantplug: %s holds only the base model (%s) of %s, the class config.json names: "
                    "loading the base model (the head would be left randomly initialised)",
                    ckpt.folder,
                    type(base).__name__,
                    type(model).__name__,
                )
                model = base
            else:
                ckpt.present_as({k: pre + k for k in have if k not in head})
    elif prefix and not keys & have and any(k.startswith(pre) for k in have):
        stripped = {k: k[len(pre) :] for k in have if k.startswith(pre)}
        if keys <= set(stripped.values()):  # every tensor of this base model is there: drop the head's
            ckpt.present_as(stripped, ignore={k for k in have if not k.startswith(pre)})
    computed = set(_computed_buffers(model)) & ckpt.keys()
    if computed:
        ckpt.present_as({}, ignore=computed)
    return model


def _mostly_found(keys: set[str], have: set[str]) -> bool:
    return bool(keys) and len(keys & have) >= len(keys) / 2


def _computed_buffers(model: nn.Module):
    """Keys of the model's non-persistent buffers (computed by the model, never loaded)."""
    for name, module in model.named_modules():
        for buffer in module._non_persistent_buffers_set:
            yield f"{name}.{buffer}" if name else buffer
