"""Checkpoints: safetensors only, in Transformers' folder format.

A checkpoint is a folder:
    config.json                      the model config; ``quantization_config.quant_method`` is the
                                     dispatch key (Transformers / vLLM read the same field)
    generation_config.json           when the model has one
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
Each safetensors file's metadata records the quantplug, plugin and backend library versions and
the quantization config (``header_metadata``).

This module owns the format: its file names, the reader of a folder's safetensors files
(``Checkpoint``, headers only, one tensor at a time) and the header metadata. ``quantplug.saving``
writes checkpoints (atomically); ``quantplug.loading`` loads them. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import QuantConfig
from .errors import CheckpointError, ConfigError
from .safetensors_io import SafetensorsFile

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
OWN_FILES = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|generation_config\.json)$"
)
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "qmodel.pt", "tf_model.h5")


def header_metadata(info: Any) -> dict[str, str]:
    """The metadata of every safetensors file quantplug writes for a model with ``info`` (its
    ``QuantizedModelInfo``, or None): format,
    versions of quantplug, the plugin and its libraries, and the quantization config."""
    meta = {"format": "pt", "quantplug_version": __version__}
    if info is not None:
        backend = info.quantizer.backend
        meta.update(
            quant_method=info.config.quant_method,
            quantization_config=info.config.to_json(indent=None),
            plugin=backend.plugin,
            plugin_version=backend.plugin_version,
            libraries=json.dumps(dict(backend.status.library_versions)),
        )
    return meta


def non_checkpoint_files(folder: Path) -> list[Path]:
    """Files of ``folder`` that are not weights or configs (tokenizer files, README, ...)."""
    return [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and not OWN_FILES.match(p.name)
        and p.name not in PICKLE_FILES
        and not p.name.startswith(".")
    ]


@dataclasses.dataclass
class Derived:
    """A tensor built from stored ones: its shape and dtype, and ``build(read)``, where
    ``read(key, first=None)`` reads a stored tensor (or only index ``first`` of its leading
    dimension)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    build: Callable[[Callable[..., torch.Tensor]], torch.Tensor]


class Checkpoint:
    """The safetensors files of a checkpoint folder: which file holds each tensor (headers only)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        single = folder / WEIGHTS_NAME
        if index.exists():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object; the index is corrupt")
            names = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, names = None, [WEIGHTS_NAME]
        else:
            pickles = [n for n in PICKLE_FILES if (folder / n).exists()]
            if pickles:
                raise CheckpointError(
                    f"{folder} holds {', '.join(pickles)}, a pickle-based format quantplug never loads (it can run "
                    f"code). Convert it to safetensors with the tool that made it, from a source you trust."
                )
            raise CheckpointError(
                f"{folder} has no {WEIGHTS_NAME} or {INDEX_NAME}; it is not a safetensors checkpoint"
            )
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        for name in names:
            if "/" in name or "\\" in name or name.startswith("."):
                raise CheckpointError(f"{index}: shard name {name!r} points outside the checkpoint folder")
            if not (folder / name).exists():
                raise CheckpointError(f"{folder}: shard {name} listed in {INDEX_NAME} is missing")
            f = SafetensorsFile(folder / name)
            self.files[name] = f
            for key in f.entries:
                if key in self.where:
                    raise CheckpointError(
                        f"{folder}: tensor {key!r} is stored twice ({self.where[key].path.name}, {name})"
                    )
                self.where[key] = f
        self._all_where = dict(self.where)
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self.where or self.where[key].path.name != fname:
                    raise CheckpointError(
                        f"{index}: lists tensor {key!r} in {fname}, but that file does not hold it"
                    )
            extra = sorted(set(self.where) - set(weight_map))
            if extra:
                raise CheckpointError(f"{index}: tensors {extra[:5]} are in the shards but not in the index")
        meta = next(iter(self.files.values())).metadata if self.files else {}
        self.metadata = meta
        try:
            aliases = json.loads(meta.get("quantplug_aliases", "{}"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{folder}: metadata quantplug_aliases is not valid JSON ({exc})") from None
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
        ):
            raise CheckpointError(
                f"{folder}: metadata quantplug_aliases must map tensor names to tensor names"
            )
        self.aliases: dict[str, str] = aliases
        self.stored_name: dict[str, str] = {}
        """Tensors presented under another name than stored (``present_as``): name -> stored key."""
        self._whole: dict[tuple[Path, str], torch.Tensor] = {}
        self.derived: dict[str, Derived] = {}
        """Tensors the model reads that are built from stored ones (``derive``): name -> how."""

    def present_as(self, names: dict[str, str], ignore: set[str] = frozenset()) -> None:
        """Present stored tensor ``k`` as ``names[k]`` (keys not in ``names`` keep theirs), and
        leave the stored keys in ``ignore`` out: the checkpoint as the model names its tensors."""
        where, stored = {}, {}
        for key, f in self.where.items():
            if key in ignore:
                continue
            name = names.get(key, key)
            where[name] = f
            stored[name] = self.stored_name.get(key, key)
        self.where, self.stored_name = where, stored
        self._all_where = dict(where)
        self.aliases = {names.get(a, a): names.get(s, s) for a, s in self.aliases.items()}

    def derive(self, views: dict[str, Derived], consumed: set[str]) -> None:
        """Present each of ``views`` (a tensor built from stored ones, e.g. one expert's slice of a
        stacked tensor, or experts stacked into one) and stop presenting the stored keys in
        ``consumed``, which only those views read."""
        self.derived.update(views)
        self.where = {k: f for k, f in self.where.items() if k not in consumed}

    def keys(self) -> set[str]:
        return set(self.where) | set(self.derived)

    def most_common_float_dtype(self) -> torch.dtype:
        """The floating dtype most tensors are stored in (float32 when there are none)."""
        counts: dict[torch.dtype, int] = {}
        for f in self.files.values():
            for dtype, *_ in f.entries.values():
                if dtype.is_floating_point:
                    counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        view = self.derived.get(key)
        if view is not None:
            return view.shape, view.dtype
        dtype, shape, _, _ = self.where[key].entries[self.stored_name.get(key, key)]
        return shape, dtype

    def read(self, key: str) -> torch.Tensor:
        view = self.derived.get(key)
        if view is not None:
            return view.build(self._read_stored)
        return self.where[key].read(self.stored_name.get(key, key))

    def _read_stored(self, key: str, first: int | None = None) -> torch.Tensor:
        """A stored tensor by the name it is presented under (including names ``derive`` stopped
        presenting); ``first``: only that index of its leading dimension."""
        f = self._all_where.get(key)
        if f is None:
            raise CheckpointError(f"{self.folder}: tensor {key!r} is not in the checkpoint")
        name = self.stored_name.get(key, key)
        if first is None:
            return f.read(name)
        if name not in f.checksums:
            return f.read_index(name, first)
        # a checksum covers the whole tensor: read it whole (checked) once, for all its indices
        cached = self._whole.get((f.path, name))
        if cached is None:
            cached = f.read(name)
            self._whole = {**dict(list(self._whole.items())[-1:]), (f.path, name): cached}
        return cached[first].clone()


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a ``CheckpointError`` naming the file when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read it as JSON: {exc}") from None


def check_recorded_config(config_path: Path, ckpt: Checkpoint, config: QuantConfig) -> None:
    """The weights' header records the config they were saved with (quantplug >= 0.1 writes it);
    config.json must say the same, or the tensors would be run as something they are not (two
    configs can share a layout, e.g. torchao int8 weight-only and int8 dynamic-activation)."""
    recorded = ckpt.metadata.get("quantization_config")
    if recorded is None:  # written by another tool, or before quantplug recorded it
        return
    where = next(iter(ckpt.files.values())).path
    try:
        data = json.loads(recorded)
        same = isinstance(data, dict) and data.get("quant_method") == config.quant_method
        same = same and type(config).from_checkpoint(data) == config
    except (json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{where}: header metadata quantization_config is corrupt ({exc})") from None
    if not same:
        raise CheckpointError(
            f"{config_path}: quantization_config {config.to_json(indent=None)} is not the config {where.name} "
            f"was saved with ({recorded}); restore config.json's quantization_config, or re-save the model"
        )
