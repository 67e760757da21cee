"""``load``: a checkpoint folder into a model, one tensor at a time.

The steps: open the folder and choose the quantizer (``config.json``'s ``quantization_config`` for a
pre-quantized checkpoint, ``config=`` for quantize-on-load, none for a plain load) -> build the model
skeleton (parameters on the meta device) -> plan what the checkpoint must hold, and verify every
key, shape and dtype against it before anything is read -> read each layer's tensors and rebuild it
through the one layer walk (``load_module``, or ``quantize_module`` on the full-precision layer),
then the remaining tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CONFIG_NAME, PICKLE_FILES, Checkpoint, check_recorded_config, read_json
from .config import QuantConfig
from .dispatch import AutoQuantizer, config_from_dict
from .errors import (
    AlreadyQuantizedError,
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    UnknownMethodError,
)
from .experts_contract import site_expected, site_load, site_quantize
from .integrations import register_if_transformers_loaded
from .kernel_layer import apply_kernels, float_dtype_of
from .layers import owner_of, transformers_tied_keys
from .naming import adapt
from .placement import Placement, placed, single_device
from .sites import present_checkpoint
from .skeleton import skeleton
from .walk import LayerWalk, progress_bar


def load(
    path: str | os.PathLike,
    *,
    config: QuantConfig | dict[str, Any] | None = None,
    model: nn.Module | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
    kernel: str | None = None,
) -> nn.Module:
    """Load a checkpoint folder, reading one tensor at a time.

    - Pre-quantized (``config.json`` has ``quantization_config``): dispatched to the plugin that owns
      its ``quant_method``; an unknown method or a missing plugin is an error saying what to install.
    - ``config=`` given: the checkpoint must be full precision; each layer is quantized as it is
      read (quantize-on-load), so peak memory stays near the quantized size.
    - Neither: a plain full-precision load.

    ``model`` is an instance of the model class to fill (needed for non-Transformers models);
    by default the class comes from ``config.json``'s ``architectures``. Every tensor's key, shape
    and (for quantized modules) dtype is checked against what the config implies.

    ``device`` puts the whole model on one device (default: the CPU). ``device_map`` spreads it
    across devices with accelerate instead: ``"auto"`` (or ``"balanced"``, ``"balanced_low_0"``,
    ``"sequential"``) plans within ``max_memory`` (device -> size) with each layer counted at its
    quantized size, or a dict maps module names to devices (``0``, ``"cuda:1"``, ``"cpu"``,
    ``"disk"``). Layers placed on ``"disk"`` are written to ``offload_folder`` as they are read;
    a backend whose layers cannot be offloaded is refused before anything is read.

    ``kernel`` (``quantplug.kernels``): ``"auto"`` (default) runs integer-grid layers on the fastest
    kernel for their grid here, ``"none"`` on their backend's module; ``kernel_choices(model)`` says.
    """
    folder, config_json = _open(path)
    quantizer, prequantized = _quantizer(folder, config_json, config)
    target = single_device(device, device_map, max_memory, offload_folder)
    if quantizer is not None and target is not None:
        quantizer.validate_environment(target)
    ckpt = Checkpoint(folder)
    built_here = model is None
    if built_here:
        model = skeleton(folder, config_json, dtype, ckpt.most_common_float_dtype())
    model = adapt(model, ckpt, built_here)  # base-model prefix, computed buffers (quantplug.naming)
    walk = LayerWalk(model, quantizer, ckpt.keys()) if quantizer is not None else None
    present_checkpoint(model, ckpt)  # MoE experts: renamed, stacked or per expert as the model needs
    if prequantized:  # layers the format may store in full precision (Transformers' FP8 writer)
        walk.keep_stored_full_precision(ckpt.spec, ckpt.keys())
    layout = _Layout.plan(model, walk, prequantized)
    layout.verify(folder, ckpt)
    if prequantized:  # the tensors fit the config; is it the config they were saved with?
        check_recorded_config(folder / CONFIG_NAME, ckpt, quantizer.config)
    place = (
        None
        if target is not None
        else placed(model, walk, layout.metas, device_map, max_memory, offload_folder)
    )
    float_dtype = dtype or (model.dtype if hasattr(model, "dtype") else None)
    kernel_dtype = float_dtype or float_dtype_of(model)  # (before the layers are replaced)
    reader = _Reader(ckpt, layout.aliases, target, float_dtype, place)
    with torch.no_grad():
        if walk is not None:
            build = _layer_builder(walk, layout, reader, prequantized)
            walk.replace(
                build if place is None else lambda name, module: place.settle(name, build(name, module)),
                desc="loading",
                progress=progress,
                trim_every=0,
            )
        _fill_the_rest(model, layout, reader, progress, place)
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    left = [k for k in left if place is None or not place.on_disk(k)]
    if left:
        raise CheckpointError(f"{folder}: tensors {_fmt(left)} were not in the checkpoint")
    return _settle(model, walk, place, target, (kernel, kernel_dtype))


def _settle(model: nn.Module, walk: LayerWalk | None, place: Placement | None, target, kernel) -> nn.Module:
    """Put the loaded model on its device(s), record what was quantized, run layers on kernels
    (``kernel``: the ``kernel=`` argument and the model's float dtype)."""
    if place is None:
        model.to(target)
    else:
        place.dispatch(model)
    if walk is not None:
        info = walk.finish()
        if place is None:  # (a device_map load keeps the backends' modules)
            apply_kernels(model, info, *kernel)
        register_if_transformers_loaded()
    model.eval()
    return model


def _open(path: str | os.PathLike) -> tuple[Path, dict]:
    """The checkpoint folder and its config.json, with clear errors for what is not a checkpoint."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; a checkpoint is a folder with {CONFIG_NAME} and safetensors files"
        )
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        if any((folder / n).exists() for n in PICKLE_FILES):
            Checkpoint(folder)  # raises the clearer reason: pickle-only weights
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    config_json = read_json(config_path)
    if not isinstance(config_json, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    return folder, config_json


def _quantizer(folder: Path, config_json: dict, config: Any) -> tuple[Any, bool]:
    """The quantizer for this load (``None`` for a plain one) and whether the checkpoint is
    pre-quantized. Config errors from config.json name the file."""
    config_path = folder / CONFIG_NAME
    saved_qc = config_json.get("quantization_config")
    if config is not None and saved_qc is not None:
        method = saved_qc.get("quant_method") if isinstance(saved_qc, dict) else saved_qc
        raise AlreadyQuantizedError(
            f"{folder} is already quantized (quant_method {method!r}): quantize its full-precision "
            f"original instead; this checkpoint loads as it is without a quantization config "
            f"(quantplug.load(path))",
            field="quant_method",
            value=method,
            allowed="a full-precision checkpoint",
        )
    if saved_qc is None:
        quantizer = AutoQuantizer.from_config(config) if config is not None else None
        if quantizer is not None and quantizer.needs_calibration():
            raise ConfigError(
                f"{type(quantizer.config).__name__} ({quantizer.config.quant_method}) needs calibration data, "
                f"which quantize-on-load cannot give it: load the full-precision model, then "
                f"quantplug.quantize(model, config, calibration_data=...)",
                field="calibration_data",
                value=None,
                allowed="a config that needs no calibration",
            )
        return quantizer, False
    if not isinstance(saved_qc, dict):
        raise CheckpointError(f"{config_path}: quantization_config must be an object, got {saved_qc!r}")
    with _naming(config_path):
        return AutoQuantizer.from_config(config_from_dict(saved_qc, from_checkpoint=True)), True


@dataclasses.dataclass
class _Layout:
    """What the checkpoint must hold: every key with its shape (and, for a pre-quantized module's
    tensors, dtype), the keys of each quantized module, and the tensors stored once under another
    name (tied weights: alias -> stored key, filled in by ``verify``)."""

    model: nn.Module
    expected: dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]]
    owned: dict[str, list[str]]
    metas: dict[str, nn.Linear]
    prequantized: bool
    method: str | None
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    quantizer: Any = None

    @classmethod
    def plan(cls, model: nn.Module, walk: LayerWalk | None, prequantized: bool) -> _Layout:
        names = set(walk.names) if walk is not None else set()
        expected = {
            k: (tuple(t.shape), None) for k, t in model.state_dict().items() if not owner_of(k, names)
        }
        owned: dict[str, list[str]] = {}
        metas = walk.meta_linears() if walk is not None else {}
        for name in walk.names if walk is not None else ():
            if prequantized:
                spec = site_expected(walk, name, metas[name])
            else:
                spec = {k: (tuple(v.shape), None) for k, v in model.get_submodule(name).state_dict().items()}
            owned[name] = [f"{name}.{k}" for k in spec]
            expected.update({f"{name}.{k}": v for k, v in spec.items()})
        method = walk.quantizer.config.quant_method if walk is not None else None
        return cls(model, expected, owned, metas, prequantized, method, quantizer=walk and walk.quantizer)

    def _error(self, folder: Path, ckpt: Checkpoint, key: str, what: str) -> CheckpointError:
        """``key`` has ``what``; the quantizer of the pre-quantized layer owning it may say why."""
        name = next((n for n, keys in self.owned.items() if key in keys), "")
        stored = {k[len(name) + 1 :]: ckpt.spec(k) for k in self.owned.get(name, ()) if k in ckpt.where}
        why = self.quantizer.explain_stored_layout(name, stored) if name and self.prequantized else None
        shown = ckpt.stored_name.get(key, key)  # the name in the file (MoE checkpoints are renamed)
        return CheckpointError(f"{folder}: tensor {shown!r} has {what}" + (f": {why}" if why else ""))

    def verify(self, folder: Path, ckpt: Checkpoint) -> None:
        """Every stored key, shape and dtype is what the plan expects, nothing is missing."""
        have = ckpt.keys()
        self.aliases = _aliases(folder, ckpt, self.model, self.expected)
        unexpected = have - set(self.expected)
        missing = set(self.expected) - have - set(self.aliases)
        if unexpected or missing:
            what = f"quant_method {self.method!r}" if self.prequantized else "the model"
            parts = [f"missing tensors {_fmt(missing)}"] if missing else []
            if unexpected:
                parts.append(f"unexpected tensors {_fmt(ckpt.stored_name.get(k, k) for k in unexpected)}")
                if any(".experts." in k for k in unexpected):
                    parts.append(
                        "experts tensors that find no place are never dropped: does the checkpoint hold more "
                        "experts, or other projections, than config.json's model?"
                    )
            raise CheckpointError(f"{folder}: does not match what {what} implies: {'; '.join(parts)}")
        model_state = self.model.state_dict()
        unchecked = set().union(*self.owned.values()) if self.prequantized else ()
        for key in sorted(have):
            shape, dt = self.expected[key]
            got_shape, got_dtype = ckpt.spec(key)
            if shape is not None and tuple(got_shape) != tuple(shape):
                raise self._error(folder, ckpt, key, f"shape {list(got_shape)}, expected {list(shape)}")
            if dt is not None and got_dtype != dt:
                raise self._error(folder, ckpt, key, f"dtype {got_dtype}, expected {dt}")
            mine = None if key in unchecked else model_state.get(key)  # load_module checks those
            if dt is None and mine is not None and not _compatible_dtype(got_dtype, mine.dtype):
                # full-precision floats may be stored in any float dtype (they are cast); nothing else
                raise CheckpointError(
                    f"{folder}: tensor {key!r} has dtype {got_dtype}, expected "
                    f"{'a floating-point dtype' if mine.dtype.is_floating_point else mine.dtype}"
                )


@dataclasses.dataclass
class _Reader:
    """Reads a tensor (or the stored source of an alias) onto its device (the target, or where the
    placement builds it); full-precision floats are cast to the model's dtype, a quantized
    module's tensors stay as stored."""

    ckpt: Checkpoint
    aliases: dict[str, str]
    target: torch.device | None
    float_dtype: torch.dtype | None
    place: Placement | None = None

    def __call__(self, key: str, cast: bool) -> torch.Tensor:
        device = self.target if self.place is None else self.place.build_device(key)
        t = self.ckpt.read(self.aliases.get(key, key)).to(device)
        return (
            t.to(self.float_dtype) if cast and self.float_dtype is not None and t.is_floating_point() else t
        )


def _layer_builder(walk: LayerWalk, layout: _Layout, read: _Reader, prequantized: bool):
    """How the walk rebuilds one layer: from its stored quantized tensors (``load_module``), or by
    filling the full-precision layer and quantizing it (``quantize_module``, quantize-on-load)."""

    def build(name: str, module: nn.Module) -> nn.Module:
        prefix = name + "."
        tensors = {k[len(prefix) :]: read(k, cast=not prequantized) for k in layout.owned[name]}
        if prequantized:
            return site_load(walk, name, layout.metas[name], tensors)
        for k, t in tensors.items():
            _assign(module, k, t)
        return site_quantize(walk, name, module)

    return build


def _fill_the_rest(
    model: nn.Module, layout: _Layout, read: _Reader, progress: bool, place: Placement | None
) -> None:
    """Assign every tensor not owned by a quantized module (all of them in a plain load, with a
    progress bar); tied tensors whose source stays in full precision share its storage, so they go
    last (read again where the placement puts the two apart, or either on disk)."""
    done = {k for keys in layout.owned.values() for k in keys}
    names = set(layout.owned)
    tied = {k for k, src in layout.aliases.items() if k not in done and not owner_of(src, names)}
    keys = sorted(k for k in layout.expected if k not in done and k not in tied)
    with progress_bar(len(keys), "loading tensors", progress, unit="tensor") as bar:
        for key in keys:
            if place is None:
                _assign(model, key, read(key, cast=True))
            else:
                place.assign(model, key, read(key, cast=True), _assign)
            bar.update(1)
    for key in sorted(tied):
        source = layout.aliases[key]
        if place is not None and (place.on_disk(source) or place.device_of(key) != place.device_of(source)):
            place.assign(model, key, read(key, cast=True), _assign)
        else:
            _assign_alias(model, key, source)


def _fmt(keys) -> str:
    keys = sorted(keys)
    return ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(
            tensor, requires_grad=old.requires_grad if old is not None else False
        )
    else:
        module._buffers[attr] = tensor


def _compatible_dtype(stored: torch.dtype, model: torch.dtype) -> bool:
    if model.is_floating_point:
        return stored.is_floating_point
    return stored == model


@contextlib.contextmanager
def _naming(config_path: Path) -> Iterator[None]:
    """Prefix the message of a config error raised inside with the config file it came from."""
    try:
        yield
    except (ConfigError, UnknownMethodError, BackendUnavailableError) as exc:
        if exc.args and isinstance(exc.args[0], str) and str(config_path) not in exc.args[0]:
            exc.args = (f"{config_path}: quantization_config: {exc.args[0]}", *exc.args[1:])
        raise


def _aliases(folder: Path, ckpt: Checkpoint, model: nn.Module, expected: dict) -> dict[str, str]:
    """Tensors stored once under another name (tied weights): alias -> stored key, checked."""
    have = ckpt.keys()
    out = {}
    candidates = [(a, s, "quantplug_aliases") for a, s in ckpt.aliases.items()]
    candidates += [(a, s, "tied weights") for a, s in transformers_tied_keys(model).items()]
    for alias, source, where in candidates:
        if alias in have or alias in out:
            continue
        if where == "tied weights" and (alias not in expected or source not in have):
            continue  # e.g. the tied head was quantized: nothing to tie
        if alias not in expected:
            raise CheckpointError(f"{folder}: {where} names {alias!r}, which the model does not have")
        if source not in have:
            raise CheckpointError(
                f"{folder}: {where} ties {alias!r} to {source!r}, which is not in the checkpoint"
            )
        shape = expected[alias][0]
        if shape is not None and tuple(ckpt.spec(source)[0]) != tuple(shape):
            raise CheckpointError(
                f"{folder}: {where} ties {alias!r} (shape {list(shape)}) to {source!r} "
                f"(shape {list(ckpt.spec(source)[0])})"
            )
        out[alias] = source
    return out


def _assign_alias(model: nn.Module, alias: str, source: str) -> None:
    mod_name, _, attr = source.rpartition(".")
    src_mod = model.get_submodule(mod_name) if mod_name else model
    tensor = src_mod._parameters.get(attr)
    if tensor is None:
        tensor = src_mod._buffers[attr]
    amod_name, _, aattr = alias.rpartition(".")
    amod = model.get_submodule(amod_name) if amod_name else model
    if aattr in amod._parameters:
        amod._parameters[aattr] = tensor
    else:
        amod._buffers[aattr] = tensor
