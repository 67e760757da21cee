"""Calibration for auto-round, independent of the library: the caller's batches checked and turned
into AutoRound's dataset (a ``ConfigError`` before the model is touched), the wrapper that lets
AutoRound tune a model that is not a Transformers decoder, and the model state AutoRound changes
and this plugin gives back. Imports torch and quantplug only."""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
from torch import nn

import quantplug

#: the keyword of the generic wrapper's forward that carries the caller's inputs
INPUTS_KEY = "quantplug_inputs"
#: the largest seqlen derived from the data when the config gives none
MAX_DERIVED_SEQLEN = 2048


def prepare_samples(config: Any, batches: list[Any], token_ids: bool) -> tuple[list[Any], int]:
    """The calibration batches as AutoRound's dataset, cut to one seqlen; ConfigError for what
    cannot calibrate (before the model is touched)."""
    prepared = []
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):
            if "input_ids" not in batch:
                raise _bad(f"calibration_data batch {i} is a dict without input_ids (keys: {sorted(batch)})")
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            ids = batch["input_ids"]
        else:
            ids = batch
        if not isinstance(ids, torch.Tensor):
            raise _bad(f"calibration_data batch {i}: input_ids is a {type(ids).__name__}, not a tensor")
        if token_ids:
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise _bad(
                    f"calibration_data batch {i} has dtype {ids.dtype}; a Transformers model calibrates on "
                    f"token ids (an integer tensor [batch, seq])"
                )
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
            if ids.dim() != 2 or ids.shape[-1] == 0:
                raise _bad(
                    f"calibration_data batch {i} has shape {list(ids.shape)}; token ids are [batch, seq]"
                )
        elif ids.dim() == 0:
            raise _bad(f"calibration_data batch {i} is a scalar tensor")
        prepared.append((batch, ids))
    lengths = [ids.shape[-1] if token_ids else _rows(ids) for _, ids in prepared]
    if not token_ids:  # one sample per batch: seqlen is the row count of the model's input
        if config.seqlen is not None and min(lengths) < config.seqlen:
            i = lengths.index(min(lengths))
            raise _bad(
                f"calibration_data batch {i} has {lengths[i]} rows; seqlen={config.seqlen} needs at least {config.seqlen}",
                field="seqlen",
            )
        return [
            {"input_ids": torch.arange(_rows(ids)).unsqueeze(0), INPUTS_KEY: b} for b, ids in prepared
        ], min(lengths)
    seqlen = config.seqlen or min(min(lengths), MAX_DERIVED_SEQLEN)
    short = [(i, n) for i, n in enumerate(lengths) if n < seqlen]
    if short:
        listing = ", ".join(f"batch {i}: {n}" for i, n in short[:5])
        raise _bad(
            f"calibration_data has samples shorter than seqlen={seqlen} tokens ({listing}); auto-round would "
            f"silently drop them: give samples of at least {seqlen} tokens or set seqlen<={min(lengths)}",
            field="seqlen",
        )
    out = []
    for batch, ids in prepared:  # one sample per row: auto-round batches them itself (batch_size), and
        for r in range(ids.shape[0]):  # exits the process on a sample with more rows than that
            if isinstance(batch, dict):
                cut = {"input_ids": ids[r : r + 1, :seqlen]}
                if "attention_mask" in batch and batch["attention_mask"] is not None:
                    cut["attention_mask"] = batch["attention_mask"][r : r + 1, :seqlen]
                out.append(cut)
            else:
                out.append(ids[r : r + 1, :seqlen])
    return out, seqlen


def _bad(message: str, field: str = "calibration_data") -> quantplug.ConfigError:
    return quantplug.ConfigError(message, field=field, value=None, allowed="see the message")


def _rows(x: torch.Tensor) -> int:
    return x.shape[-2] if x.dim() >= 2 else x.shape[0]


def count_samples(sample: Any) -> int:
    ids = sample["input_ids"] if isinstance(sample, dict) else sample
    return ids.shape[0] if ids.dim() > 1 else 1


def shallow_copy(linear: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` sharing ``linear``'s tensors (new Parameter objects)."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class Wrapped(nn.Module):
    """A model that is not a Transformers decoder, as AutoRound runs one: the whole model is one
    block, its calibration inputs come in as ``quantplug_inputs`` next to stand-in token ids (one id
    per input row: auto-round masks its loss by them)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([inner])  # AutoRound tunes the ModuleLists it finds, block by block
        self.config = types.SimpleNamespace(architectures=[], model_type="quantplug_wrapped", to_dict=dict)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.blocks.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.blocks.parameters()).device

    def forward(self, input_ids=None, quantplug_inputs=None, **_):
        return quantplug.run_batch(self.blocks[0], quantplug_inputs)


@contextlib.contextmanager
def restored(model: nn.Module, exclude: set[str]):
    """Give every module outside ``exclude`` back its own state afterwards: AutoRound casts the whole
    model to its amp dtype (bf16 on CPU), which would round the layers left in full precision; it
    turns off ``requires_grad``, and leaves attributes behind (a block's ``forward`` bound on the
    instance, its bookkeeping names)."""
    keep, state = [], []
    for mod_name, mod in model.named_modules():
        if any(mod_name == e or mod_name.startswith(e + ".") for e in exclude):
            continue
        state.append((mod, set(mod.__dict__), mod.training))
        for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None:
                keep.append((mod, attr, t, t.data, t.requires_grad))
    try:
        yield
    finally:
        for mod, attrs, training in state:
            for extra in set(mod.__dict__) - attrs:
                delattr(mod, extra)
            mod.training = training
        for mod, attr, t, data, grad in keep:
            if attr in mod._parameters:
                mod._parameters[attr] = t
                t.data = data
                t.requires_grad_(grad)
            else:
                mod._buffers[attr] = data
