"""What a model holds in memory, byte for byte, and what its checkpoint would hold.

``model_bytes`` counts every tensor a loaded model keeps alive: parameters and buffers, and also
the tensors backends keep outside them (HQQ's ``meta`` dict of scales and zeros, a bitsandbytes
parameter's ``quant_state``, the inner tensors of torchao's tensor subclasses), each storage once.
``checkpoint_bytes`` is the size of the tensors ``quantplug.save`` would write, the cross-check:
a model holds at least that much (plus buffers it computes, such as rotary ``inv_freq``).
"""

from __future__ import annotations

import os
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["PeakMemory", "checkpoint_bytes", "held_tensors", "model_bytes"]

_DEPTH = 4  # attribute levels followed below a module (module.meta["scale"] is 2)
_SCALARS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)
_HOOKS = ("_forward", "_backward", "_state_dict", "_load_state_dict")
_OPAQUE = (nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)


def _plain(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """``t``, or the plain tensors inside a wrapper tensor subclass (torchao's, which has no storage
    of its own), found through ``__tensor_flatten__``."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _plain(getattr(t, name))
    else:
        yield t


def _tensors_in(value: Any, depth: int, seen: set[int]) -> Iterator[torch.Tensor]:
    """The tensors in ``value``: a tensor (and what hangs off it, e.g. ``Params4bit.quant_state``),
    or the tensors in a dict, list, tuple, set or plain object's attributes, ``depth`` levels down.
    Submodules are not entered (``model.modules()`` visits them); functions and classes are skipped."""
    if depth < 0 or isinstance(value, (*_SCALARS, *_OPAQUE)) or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield from _plain(value)
        extra = getattr(value, "__dict__", None)
        if extra:
            yield from _tensors_in(dict(extra), depth - 1, seen)
        return
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return
    for item in list(items):
        yield from _tensors_in(item, depth - 1, seen)


def held_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor ``model`` keeps alive (may repeat a storage; ``model_bytes`` counts each once)."""
    seen: set[int] = set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None:
                    yield from _tensors_in(t, _DEPTH, seen)
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules") or key.startswith(_HOOKS):
                continue  # visited above / by model.modules(), or hook registries
            yield from _tensors_in(value, _DEPTH, seen)


def _storage_key(t: torch.Tensor) -> tuple[str, int, int]:
    storage = t.untyped_storage()
    return (t.device.type, storage.data_ptr(), storage.nbytes())


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor storage ``model`` holds (``held_tensors``), each counted once (tied
    embeddings, views); tensors on the meta device hold nothing."""
    sizes: dict[tuple[str, int, int], int] = {}
    for t in held_tensors(model):
        if t.device.type == "meta":
            continue
        key = _storage_key(t)
        sizes[key] = key[2]
    return sum(sizes.values())


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of the tensors ``quantplug.save(model, ...)`` would write (tied tensors once)."""
    from .saving import checkpoint_tensors

    tensors, _aliases = checkpoint_tensors(model)
    return sum(t.numel() * t.element_size() for _, t in tensors)


class PeakMemory:
    """The peak resident memory of this process while the ``with`` block runs, above what it held
    when the block began (``extra_bytes``): sampled every ``interval`` seconds from
    ``/proc/self/statm`` (Linux; elsewhere ``extra_bytes`` stays ``None``). On CUDA, quantizing
    there, ``torch.cuda.max_memory_allocated`` is the figure to use instead."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.extra_bytes: int | None = None
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def _sample(self, start: int) -> None:
        peak = start
        while not self._stop.wait(self.interval):
            peak = max(peak, self._rss() or peak)
        self.extra_bytes = max(peak, self._rss() or peak) - start

    def __enter__(self) -> PeakMemory:
        start = self._rss()
        self._thread = threading.Thread(target=self._sample, args=(start,), daemon=True) if start else None
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
