"""GPTQ calibration over a whole model: which inputs each layer's Hessian is gathered from.

The algorithm is GPTQModel's (``GPTQ.add_batch`` accumulates each layer's input Hessian,
``GPTQ.hf_quantize`` rounds the weights with error feedback; the same calls optimum's
``GPTQQuantizer`` makes for Transformers). This module only orders the work, the way optimum and
GPTQModel do: the inputs of the first repeated block are captured once, then each block is
calibrated on the outputs of the blocks before it, already quantized (``true_sequential``: each
layer of a block also on the outputs of the layers quantized before it). Layers outside the
repeated blocks (or a model without any) are calibrated last, from a pass of the whole model.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import quantplug

_INDEX = re.compile(r"^(?P<blocks>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


class _CapturedInputs(Exception):
    """Raised by the hook on the first block to stop the forward pass once its inputs are stored."""


def check_batches(model: nn.Module, batches: list[Any]) -> None:
    """Refuse calibration batches a language model cannot run: quantplug.ConfigError, raised before
    any weight is changed."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if ids is None:
            continue  # other keyword inputs (pixel values, embeddings): the model checks them
        where = f"calibration_data batch {i}"
        if ids.numel() == 0:
            raise quantplug.ConfigError(
                f"{where} is empty (shape {list(ids.shape)}); every batch needs at least one token",
                field="calibration_data",
                value=list(ids.shape),
                allowed="non-empty batches of token ids",
            )
        if vocab is None:
            continue
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
            raise quantplug.ConfigError(
                f"{where} is a {ids.dtype} tensor of shape {list(ids.shape)}; this model takes token ids: "
                f"an integer tensor [batch, tokens] (e.g. tokenizer(texts, return_tensors='pt').input_ids)",
                field="calibration_data",
                value=f"{ids.dtype} {list(ids.shape)}",
                allowed="integer token ids of shape [batch, tokens]",
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise quantplug.ConfigError(
                f"{where} holds token ids {lo}..{hi}, outside this model's vocabulary (0..{vocab - 1}); "
                f"tokenize the calibration text with this model's tokenizer",
                field="calibration_data",
                value=[lo, hi],
                allowed=f"token ids in 0..{vocab - 1}",
            )


def find_blocks(model: nn.Module, names: list[str], block_name: str | None) -> tuple[str | None, Any]:
    """The repeated blocks to calibrate one after another: ``block_name`` when given (it must be a
    ``ModuleList``), else the ``ModuleList`` holding the most of the layers to quantize (none: a model
    without repeated blocks, calibrated in one pass)."""
    if block_name is not None:
        try:
            blocks = model.get_submodule(block_name)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList):
            raise quantplug.ConfigError(
                f"GptqConfig: block_name_to_quantize={block_name!r} is not a list of blocks in this model "
                f"({type(blocks).__name__ if blocks is not None else 'no such module'}); give the name of "
                f"its repeated layers (e.g. 'model.layers'), or null to find them",
                field="block_name_to_quantize",
                value=block_name,
                allowed="the name of an nn.ModuleList of blocks",
            )
        return block_name, blocks
    counts: dict[str, int] = {}
    for name in names:
        m = _INDEX.match(name)
        while m is not None:
            prefix = m["blocks"]
            with contextlib.suppress(AttributeError):
                if isinstance(model.get_submodule(prefix), nn.ModuleList):
                    counts[prefix] = counts.get(prefix, 0) + 1
                    break
            m = _INDEX.match(prefix)
    if not counts:
        return None, None
    best = max(counts, key=counts.get)
    return best, model.get_submodule(best)


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    config = getattr(model, "config", None)
    had = getattr(config, "use_cache", None)
    if had is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if had is not None:
            config.use_cache = had


def _capture_inputs(model: nn.Module, first: nn.Module, batches: list[Any]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block is called with, one per batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _CapturedInputs

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_CapturedInputs):
                quantplug.run_batch(model, batch)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise quantplug.PluginError(
            f"quantplug-gptqmodel: the first block ran for {len(captured)} of {len(batches)} calibration "
            f"batches; set block_name_to_quantize to the model's repeated blocks"
        )
    return captured


def _next_inputs(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    out = []
    for args, kwargs in inputs:
        result = block(*args, **kwargs)
        hidden = result[0] if isinstance(result, (tuple, list)) else result
        if args:
            out.append(((hidden, *args[1:]), kwargs))
        else:
            out.append((args, {**kwargs, "hidden_states": hidden}))
    return out


def calibrate_model(
    model: nn.Module,
    names: list[str],
    batches: list[Any],
    config: Any,
    quantize_layers: Callable[[list[str], Callable[[], None]], None],
) -> None:
    """Quantize every layer in ``names`` with ``quantize_layers(subset, run)``, which gathers the
    subset's statistics while ``run()`` feeds it data, then replaces the layers."""
    block_name, blocks = find_blocks(model, names, config.block_name_to_quantize)
    todo = list(names)
    with _no_kv_cache(model):
        if blocks is not None and len(blocks):
            inputs = _capture_inputs(model, blocks[0], batches)
            bar = _progress(len(blocks), f"GPTQ calibration ({block_name})")
            for i, block in enumerate(blocks):
                mine = [n for n in todo if n.startswith(f"{block_name}.{i}.")]
                todo = [n for n in todo if n not in mine]
                subsets = [[n] for n in mine] if config.true_sequential else [mine] if mine else []
                for subset in subsets:
                    quantize_layers(subset, lambda inputs=inputs, block=block: _run_block(block, inputs))
                if i + 1 < len(blocks):
                    inputs = _next_inputs(block, inputs)
                bar.update(1)
            bar.close()
        if todo:
            quantize_layers(todo, lambda: [quantplug.run_batch(model, b) for b in batches])


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> None:
    for args, kwargs in inputs:
        block(*args, **kwargs)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", leave=False)
