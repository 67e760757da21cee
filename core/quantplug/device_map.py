"""A ``device_map`` and ``max_memory`` as the user gives them, checked against this machine and
the model and put in accelerate's form (``quantplug.placement`` plans and places with them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

DISK = "disk"
#: ``device_map`` strings that ask accelerate to plan
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def available_devices() -> list[str]:
    """The devices a ``device_map`` may name on this machine."""
    out = ["cpu", DISK]
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            out += [f"{kind}:{i}" for i in range(backend.device_count())]
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def canonical_device(value: Any, where: str) -> str:
    """``value`` (an int for an accelerator index, ``"cpu"``, ``"disk"``, ``"cuda:1"``, a
    ``torch.device``) as a device string of this machine, or a ``ConfigError`` saying which
    devices exist."""
    have = available_devices()
    accelerators = [d for d in have if d not in ("cpu", DISK, "mps")]
    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        name = None
    elif isinstance(value, int):
        name = accelerators[0].split(":")[0] + f":{value}" if accelerators else f"accelerator {value}"
    else:
        name = str(value)
        if name in ("cuda", "xpu"):
            name += ":0"
    if name not in have:
        raise ConfigError(
            f"{where} names device {value!r}, which this machine does not have; its devices are "
            f"{', '.join(have)}",
            field="device_map",
            value=value,
            allowed=", ".join(have),
        )
    return name


def checked_max_memory(max_memory: Mapping[Any, Any]) -> dict[Any, int]:
    from accelerate.utils import convert_file_size_to_int

    out: dict[Any, int] = {}
    for device, size in max_memory.items():
        name = canonical_device(device, "max_memory")
        try:
            out[accelerate_key(name)] = convert_file_size_to_int(size)
        except (ValueError, TypeError):
            raise ConfigError(
                f"max_memory[{device!r}] = {size!r} is not a size; use bytes or a string such as '2GiB'",
                field="max_memory",
                value=size,
            ) from None
    return out


def accelerate_key(device: str) -> int | str:
    """accelerate keys accelerators by index in ``max_memory``."""
    return int(device.split(":")[1]) if ":" in device else device


def checked_map(
    model: nn.Module, device_map: Mapping[str, Any], quantized: Mapping[str, Any]
) -> dict[str, str]:
    """A user's dict map: devices that exist, module names the model has, no quantized layer
    split, every tensor placed."""
    from accelerate.utils import check_device_map

    modules = dict(model.named_modules())
    tensors = {k for k, _ in [*model.named_parameters(), *model.named_buffers()]}
    out = {}
    for key, device in device_map.items():
        if not isinstance(key, str) or (key not in modules and key not in tensors):
            raise ConfigError(
                f"device_map key {key!r} names no module of {type(model).__name__} (use '' for the whole "
                f"model, or names such as {names_of(list(modules)[1:4])})",
                field="device_map",
                value=key,
            )
        inside = next((q for q in quantized if key.startswith(q + ".")), None)
        if inside is not None:
            raise ConfigError(
                f"device_map key {key!r} is inside the quantized layer {inside!r}, which is placed whole: "
                f"place {inside!r} instead",
                field="device_map",
                value=key,
            )
        out[key] = canonical_device(device, f"device_map[{key!r}]")
    out = _flat(model, out)
    try:
        check_device_map(model, out)
    except ValueError as exc:
        raise ConfigError(
            f"device_map does not place every tensor ({exc}); add their modules, or '' for the rest",
            field="device_map",
        ) from None
    return out


def _flat(model: nn.Module, device_map: dict[str, str]) -> dict[str, str]:
    """``device_map`` with no entry inside another (accelerate's form): a module whose parts are
    placed elsewhere is replaced by its children, which keep its device unless placed themselves."""
    out = dict(device_map)
    while True:
        split = next(
            (k for k in out if any(o != k and (k == "" or o.startswith(k + ".")) for o in out)), None
        )
        if split is None:
            return out
        module = model.get_submodule(split)
        own = [n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        if own:
            raise ConfigError(
                f"device_map places parts of {split or 'the model'!r} elsewhere, but it holds tensors "
                f"itself ({names_of(own)}): place its children one by one",
                field="device_map",
                value=split,
            )
        device = out.pop(split)
        for child, _ in module.named_children():
            out.setdefault(f"{split}.{child}" if split else child, device)


def names_of(names: list[str]) -> str:
    """Up to four names quoted (the model itself for ""), and how many more."""
    shown = ", ".join(repr(n) if n else "the whole model" for n in names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")
