"""Placement across devices for ``quantplug.load(..., device_map=)``: accelerate's plan and hooks,
quantplug's layers.

accelerate is the engine: ``infer_auto_device_map`` plans ``"auto"`` (and ``"balanced"``,
``"balanced_low_0"``, ``"sequential"``) from ``max_memory``, and ``dispatch_model`` attaches the
hooks that move activations between devices and bring disk-offloaded weights in for each forward.
quantplug adds what accelerate cannot know:

- the size of each layer once quantized (the plan is made on the skeleton with every layer
  replaced by a stand-in holding the tensors the backend will store, so 4-bit layers are planned
  at 4-bit sizes);
- building each layer on its device as it is read, and writing the layers placed on ``"disk"`` to
  ``offload_folder`` one at a time, so loading holds no more on a device than the plan gives it,
  plus the layer being built (while it runs, accelerate copies each offloaded block in for its
  forward: bench/placement.py);
- refusing, before anything is read, a plan that offloads the layers of a backend whose modules
  accelerate's hooks cannot offload (``Quantizer.offload_refusal``), naming the layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device_map import DISK, STRATEGIES, canonical_device, checked_map, checked_max_memory, names_of
from .errors import ConfigError
from .experts_contract import site_expected
from .layers import set_submodule


@dataclasses.dataclass
class Placement:
    """Where each module goes (``device_map``: module name -> device string, accelerate's form),
    the offload folder and what has been written there."""

    device_map: dict[str, str]
    offload_folder: Path | None
    index: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def main_device(self) -> str:
        """Where offloaded modules execute: the first accelerator of the map, else the CPU."""
        return next((d for d in self.device_map.values() if d not in ("cpu", DISK)), "cpu")

    def device_of(self, name: str) -> str:
        """The device of the module or tensor ``name``: its longest prefix in the map."""
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            key = ".".join(parts[:i])
            if key in self.device_map:
                return self.device_map[key]
        raise ConfigError(f"device_map places no module holding {name!r}", field="device_map")

    def build_device(self, name: str) -> torch.device:
        """Where ``name``'s tensors are read and its layer built (the CPU for a disk-offloaded one)."""
        device = self.device_of(name)
        return torch.device("cpu" if device == DISK else device)

    def offloaded(self, name: str) -> bool:
        """Whether accelerate's hooks will move ``name``'s weights in at each forward: it is on disk,
        or in CPU memory while the model runs on an accelerator."""
        device = self.device_of(name)
        return device == DISK or (device == "cpu" and self.main_device != "cpu")

    def settle(self, name: str, module: nn.Module) -> nn.Module:
        """``module`` (built on its device), its tensors written to the offload folder and left on
        the meta device when ``name`` is placed on disk."""
        if self.device_of(name) == DISK:
            for key, tensor in _persistent_tensors(module):
                self._write(f"{name}.{key}", tensor)
                _set_meta(module, key)
        return module

    def assign(self, model: nn.Module, key: str, tensor: torch.Tensor, assign) -> None:
        """Put one tensor of the model in place with ``assign``, written to disk (and a meta tensor
        in its place) when its module is placed there."""
        if self.device_of(key) == DISK and not _non_persistent(model, key):
            self._write(key, tensor)
            tensor = torch.empty_like(tensor, device="meta")
        assign(model, key, tensor)

    def on_disk(self, key: str) -> bool:
        return key in self.index

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        from accelerate.utils import offload_weight

        offload_weight(tensor.detach(), key, str(self.offload_folder), self.index)

    def dispatch(self, model: nn.Module) -> nn.Module:
        """Write the offload index and hand the model to accelerate's ``dispatch_model``."""
        from accelerate import dispatch_model

        if self.index:
            # written whole (not merged with an index left there by another load)
            (self.offload_folder / "index.json").write_text(json.dumps(self.index, indent=1))
        return dispatch_model(
            model,
            self.device_map,
            main_device=self.main_device,
            offload_dir=str(self.offload_folder) if self.index else None,
            offload_buffers=True,  # quantized layers keep their codes in buffers
        )


def single_device(device, device_map, max_memory, offload_folder) -> torch.device | None:
    """The one device of a ``load`` without ``device_map`` (``None`` with one); ``ConfigError`` for
    placement arguments without ``device_map``, or ``device`` with it."""
    if device_map is None:
        extra = [
            n for n, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v is not None
        ]
        if extra:
            raise ConfigError(
                f"{' and '.join(extra)} apply only with device_map= (e.g. device_map='auto')",
                field=extra[0],
                value=max_memory if extra[0] == "max_memory" else offload_folder,
            )
        return torch.device(device if device is not None else "cpu")
    if device is not None:
        raise ConfigError(
            f"pass device= (the whole model on one device) or device_map= (spread by accelerate), not "
            f"both: got device={device!r}, device_map={device_map!r}",
            field="device",
            value=device,
        )
    return None


def placed(
    model: nn.Module, walk: Any, metas: Mapping[str, nn.Linear], device_map, max_memory, offload_folder
) -> Placement:
    """The ``Placement`` of ``load``: ``model`` (the skeleton) planned with each layer of ``walk``
    (a ``LayerWalk``, or ``None`` for a plain load; ``metas``: its layers as meta Linears) at its
    quantized size, refused before anything is read where it would offload layers the backend
    cannot offload, and the backend's devices checked."""
    sizes = {}
    if walk is not None:
        for name, meta in metas.items():
            spec = site_expected(walk, name, meta)
            # a tensor of unchecked dtype counts at the layer's float dtype (experts: no ``weight``)
            floats = [t.dtype for t in meta.parameters() if t.is_floating_point()]
            default = floats[0] if floats else meta.weight.dtype
            sizes[name] = {k: (shape or (), dt or default) for k, (shape, dt) in spec.items()}
    place = plan(model, device_map, max_memory, offload_folder, sizes)
    if walk is not None:
        refuse_unoffloadable(place, walk.names, walk.quantizer)
        devices = {place.build_device(n) for n in walk.names}
        if any(place.offloaded(n) for n in walk.names):
            devices.add(torch.device(place.main_device))
        for device in sorted(devices, key=str):
            walk.quantizer.validate_environment(device)
    return place


def plan(
    model: nn.Module,
    device_map: str | Mapping[str, Any],
    max_memory: Mapping[Any, Any] | None,
    offload_folder: str | os.PathLike | None,
    quantized_sizes: Mapping[str, Mapping[str, tuple[tuple[int, ...], torch.dtype]]],
) -> Placement:
    """The placement of ``model`` (a skeleton on the meta device) for ``device_map``: a dict given
    by the user, checked, or accelerate's plan for a strategy string, with every layer in
    ``quantized_sizes`` (layer name -> tensor name -> (shape, dtype)) counted at its quantized
    size."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError(
            "device_map= places the model with accelerate, which is not installed: pip install accelerate "
            "(or 'quantplug[transformers]')",
            field="device_map",
            value=device_map,
        ) from None
    if max_memory is not None:
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise ConfigError(
                f"max_memory must be a dict of device -> size (e.g. {{'cpu': '2GiB', 0: '20GiB'}}), got "
                f"{max_memory!r}",
                field="max_memory",
                value=max_memory,
            )
        max_memory = checked_max_memory(max_memory)
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise ConfigError(
                f"device_map={device_map!r} is not a strategy; use one of {', '.join(STRATEGIES)}, or a "
                f"dict of module name -> device",
                field="device_map",
                value=device_map,
                allowed=", ".join(STRATEGIES),
            )
        with _sized_as_quantized(model, quantized_sizes):
            chosen = _infer(model, device_map, max_memory)
    elif isinstance(device_map, Mapping):
        if max_memory is not None:
            raise ConfigError(
                "max_memory is for device_map='auto' (accelerate plans within it); a dict device_map "
                "already says where each module goes: drop one of them",
                field="max_memory",
                value=max_memory,
            )
        chosen = checked_map(model, device_map, quantized_sizes)
    else:
        raise ConfigError(
            f"device_map must be one of {', '.join(STRATEGIES)} or a dict of module name -> device, got "
            f"{type(device_map).__name__}",
            field="device_map",
            value=device_map,
        )
    folder = None
    if DISK in chosen.values():
        if offload_folder is None:
            on_disk = [k for k, v in chosen.items() if v == DISK]
            raise ConfigError(
                f"the device map places {names_of(on_disk)} on disk: pass offload_folder= (an empty or "
                f"reusable folder for their weights), or give the devices more max_memory",
                field="offload_folder",
                value=None,
            )
        folder = Path(offload_folder)
        folder.mkdir(parents=True, exist_ok=True)
    return Placement(chosen, folder)


def _infer(model: nn.Module, strategy: str, max_memory: dict | None) -> dict[str, str]:
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    if strategy != "sequential":
        max_memory = get_balanced_memory(
            model, max_memory, no_split_module_classes=no_split, low_zero=strategy == "balanced_low_0"
        )
    chosen = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return {k: canonical_device(v, f"device_map[{k!r}]") for k, v in chosen.items()}


class _Stand(nn.Module):
    """A quantized layer as the plan sees it: meta buffers of its stored shapes and dtypes."""

    def __init__(self, tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        for i, (shape, dtype) in enumerate(tensors.values()):
            self.register_buffer(f"t{i}", torch.empty(shape, dtype=dtype, device="meta"))


class _sized_as_quantized:
    """Each quantized layer of ``model`` replaced by its ``_Stand`` while accelerate plans."""

    def __init__(self, model: nn.Module, sizes: Mapping[str, Mapping[str, Any]]):
        self.model, self.sizes, self.saved = model, sizes, {}

    def __enter__(self):
        for name, tensors in self.sizes.items():
            self.saved[name] = self.model.get_submodule(name)
            set_submodule(self.model, name, _Stand(tensors))

    def __exit__(self, *exc):
        for name, module in self.saved.items():
            set_submodule(self.model, name, module)


def refuse_unoffloadable(placement: Placement, layers: list[str], quantizer: Any) -> None:
    """A ``ConfigError`` naming the first quantized layer the plan offloads when the backend's
    layers cannot be offloaded (``Quantizer.offload_refusal``); nothing has been read yet."""
    offloaded = [n for n in layers if placement.offloaded(n)]
    if not offloaded:
        return
    reason = quantizer.offload_refusal()
    if reason is None:
        return
    where = placement.device_of(offloaded[0])
    raise ConfigError(
        f"{offloaded[0]!r}{f' (and {len(offloaded) - 1} more quantized layers)' if len(offloaded) > 1 else ''} "
        f"would be offloaded to {where} "
        f"by the device map, but backend {quantizer.backend.name!r} cannot be offloaded: {reason}. Give the "
        f"accelerators more max_memory (or place these layers on one) so every quantized layer stays "
        f"resident, or use a backend whose layers offload (quantplug-rtn does)",
        field="device_map",
        value=where,
    )


def _persistent_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    from accelerate.utils import named_module_tensors

    return list(named_module_tensors(module, include_buffers=True, recurse=True, remove_non_persistent=True))


def _set_meta(module: nn.Module, key: str) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, key, "meta")


def _non_persistent(model: nn.Module, key: str) -> bool:
    mod_name, _, attr = key.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    return attr in module._buffers and attr in module._non_persistent_buffers_set
