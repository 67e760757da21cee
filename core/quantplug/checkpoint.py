"""Checkpoints: safetensors only, in Transformers' folder format, written atomically.

A checkpoint is a folder:
    config.json                      the model config; ``quantization_config.quant_method`` is the
                                     dispatch key (Transformers / vLLM read the same field)
    generation_config.json           when the model has one
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
Each safetensors file's metadata records the quantplug, plugin and backend library versions.

``save`` writes into a temporary folder beside the target and swaps it in with one atomic rename,
so a crash mid-save leaves the previous checkpoint intact; other files already in the target
folder (a tokenizer, a README) are carried over.

``load`` builds the model skeleton without allocating full-precision weights (parameters on the
meta device), reads one tensor at a time, and either lets the backend rebuild each quantized module
from its tensors (a pre-quantized checkpoint) or quantizes each layer as it is read (``config=``,
quantize-on-load). Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import QuantConfig
from .dispatch import AutoQuantizer, config_from_dict
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    PluginError,
    UnknownMethodError,
)
from .integrations import register_if_transformers_loaded
from .layers import as_linear, as_linear_meta, plan, set_submodule, transformers_tied_keys
from .safetensors_io import CHECKSUMS_KEY, SafetensorsFile, write_file
from .sizes import parse_size
from .walk import INFO_ATTR, QuantizedModelInfo, attach_info, progress_bar, release_freed_memory

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_OWN_FILES = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|generation_config\.json)$"
)
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "qmodel.pt", "tf_model.h5")


# -- save ---------------------------------------------------------------------------------------


def _checkpoint_tensors(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """The tensors to store, in model order, and aliases (tied tensors stored once): alias -> kept."""
    info: QuantizedModelInfo | None = getattr(model, INFO_ATTR, None)
    qnames = set(info.modules) if info else set()
    out: list[tuple[str, torch.Tensor]] = []
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}

    def add(key: str, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {key!r} is on the meta device (never loaded); cannot save it")
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            return
        if ident is not None:
            seen[ident] = key
        out.append((key, t))

    def walk(module: nn.Module, prefix: str) -> None:
        name = prefix[:-1]
        if name in qnames:
            for k, t in info.quantizer.module_tensors(name, module).items():
                add(prefix + k, t)
            return
        for k, p in module._parameters.items():
            if p is not None:
                add(prefix + k, p.detach())
        for k, b in module._buffers.items():
            if b is not None and k not in module._non_persistent_buffers_set:
                add(prefix + k, b)
        for k, child in module._modules.items():
            if child is not None:
                walk(child, prefix + k + ".")

    walk(model, "")
    return out, aliases


def _versions(info: QuantizedModelInfo | None) -> dict[str, str]:
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


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
    elif _rename_exchange(tmp, final):
        shutil.rmtree(tmp)  # now holds the previous checkpoint
    else:  # no atomic exchange here: a crash between the two renames leaves the old one at `old`
        old = final.with_name(f".{final.name}.quantplug-old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    _fsync_dir(final.parent)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` every file of ``old`` that is not part of a checkpoint."""
    for entry in old.iterdir():
        if _OWN_FILES.match(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _config_json(model: nn.Module, info: QuantizedModelInfo | None) -> str:
    """config.json for ``model``: its Transformers config where it has one, with
    ``quantization_config`` set from what quantplug did to it (and removed when nothing)."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        data = json.loads(hf_config.to_json_string(use_diff=True))
        data["architectures"] = [type(model).__name__]
        float_dtype = getattr(model, "dtype", None)
        if isinstance(float_dtype, torch.dtype):
            data["dtype"] = str(float_dtype).removeprefix("torch.")
    else:
        data = {"quantplug_model_class": f"{type(model).__module__}.{type(model).__qualname__}"}
    data.pop("quantization_config", None)
    if info is not None:
        data["quantization_config"] = info.config.to_dict()
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def non_checkpoint_files(folder: Path) -> list[Path]:
    """Files of ``folder`` that are not weights or configs (tokenizer files, README, ...)."""
    return [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and not _OWN_FILES.match(p.name)
        and p.name not in _PICKLE_FILES
        and not p.name.startswith(".")
    ]


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    extra_files: list[str | os.PathLike] = (),
) -> Path:
    """Save ``model`` (quantized by quantplug, or full precision) as a safetensors checkpoint folder.

    The write is atomic: the folder at ``path`` is replaced in one step only once every file is
    complete and fsynced. Files already in ``path`` that are not checkpoint files are kept.
    ``extra_files`` (e.g. a tokenizer's files) are copied in as part of the same atomic write.
    """
    final = Path(path).absolute()
    if final.is_symlink():  # replace the folder the link points to, and keep the link
        final = final.resolve()
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"{final} exists and is not a folder; choose another path")
    limit = parse_size(max_shard_size, "max_shard_size")
    info: QuantizedModelInfo | None = getattr(model, INFO_ATTR, None)
    if info is not None and not info.quantizer.backend.capabilities.serializable:
        raise CheckpointError(
            f"backend {info.config.quant_method!r} declares that its models cannot be saved"
        )
    tensors, aliases = _checkpoint_tensors(model)
    meta = _versions(info)
    if info is not None:
        extra = info.quantizer.checkpoint_metadata({n: model.get_submodule(n) for n in info.modules})
        bad = [
            k
            for k, v in extra.items()
            if k in meta or k == CHECKSUMS_KEY or not (isinstance(k, str) and isinstance(v, str))
        ]
        if bad:
            raise PluginError(
                f"backend {info.config.quant_method!r}: checkpoint_metadata() returned entries {bad[:5]} that "
                f"are not strings or clash with quantplug's own; report this to the maintainers of "
                f"{info.quantizer.backend.plugin or 'the plugin'}"
            )
        meta.update(extra)
    if aliases:
        meta["quantplug_aliases"] = json.dumps(aliases)

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in tensors:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += n

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.quantplug-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        (tmp / CONFIG_NAME).write_text(_config_json(model, info))
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_string"):
            (tmp / GENERATION_CONFIG_NAME).write_text(gen.to_json_string(use_diff=True))
        if len(shards) == 1:
            write_file(tmp / WEIGHTS_NAME, shards[0], meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                total += write_file(tmp / fname, shard, meta)
                weight_map.update({k: fname for k, _ in shard})
            index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        for f in tmp.iterdir():
            if f.name in (CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        for extra in extra_files:
            extra = Path(extra)
            if _OWN_FILES.match(extra.name):
                raise CheckpointError(f"extra file {extra} would overwrite a checkpoint file; rename it")
            shutil.copy2(extra, tmp / extra.name)
        if final.is_dir():
            _carry_over(final, tmp)
        _fsync_dir(tmp)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# -- load ---------------------------------------------------------------------------------------


class Checkpoint:
    """The safetensors files of a checkpoint folder: which file holds each tensor (headers only)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        single = folder / WEIGHTS_NAME
        if index.exists():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object; the index is corrupt")
            names = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, names = None, [WEIGHTS_NAME]
        else:
            pickles = [n for n in _PICKLE_FILES if (folder / n).exists()]
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

    def keys(self) -> set[str]:
        return set(self.where)

    def most_common_float_dtype(self) -> torch.dtype:
        """The floating dtype most tensors are stored in (float32 when there are none)."""
        counts: dict[torch.dtype, int] = {}
        for f in self.files.values():
            for dtype, *_ in f.entries.values():
                if dtype.is_floating_point:
                    counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        dtype, shape, _, _ = self.where[key].entries[key]
        return shape, dtype

    def read(self, key: str) -> torch.Tensor:
        return self.where[key].read(key)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read it as JSON: {exc}") from None


_register_parameter = nn.Module.register_parameter
_meta_init = threading.local()
_meta_lock = threading.Lock()
_meta_users = 0


def _register_parameter_maybe_on_meta(module, name, param):
    _register_parameter(module, name, param)
    if getattr(_meta_init, "active", False) and param is not None and param.device.type != "meta":
        p = module._parameters[name]
        module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (buffers stay real, so computed ones like rotary
    frequencies are right) — like accelerate's ``init_empty_weights(include_buffers=False)``.
    Only the calling thread is affected: models built meanwhile in other threads are normal."""
    global _meta_users
    with _meta_lock:
        if _meta_users == 0:
            nn.Module.register_parameter = _register_parameter_maybe_on_meta
        _meta_users += 1
    _meta_init.active = True
    try:
        yield
    finally:
        _meta_init.active = False
        with _meta_lock:
            _meta_users -= 1
            if _meta_users == 0:
                nn.Module.register_parameter = _register_parameter


def _skeleton(
    folder: Path, config_json: dict, dtype: torch.dtype | None, stored_dtype: torch.dtype
) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{folder} needs Transformers to rebuild the model: pip install 'quantplug[transformers]', "
            f"or pass model= (an instance of the model class to fill)"
        ) from None
    archs = config_json.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: architectures={archs!r} names no Transformers model class; pass model="
        )
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # quantplug applies it; Transformers must not
    dtype = dtype or getattr(hf_config, "dtype", None) or stored_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _params_on_meta():
        model = cls._from_config(hf_config, dtype=dtype)
    if (folder / GENERATION_CONFIG_NAME).exists():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model


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


def load(
    path: str | os.PathLike,
    *,
    config: QuantConfig | dict[str, Any] | None = None,
    model: nn.Module | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
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
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; a checkpoint is a folder with {CONFIG_NAME} and safetensors files"
        )
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        if any((folder / n).exists() for n in _PICKLE_FILES):
            Checkpoint(folder)  # raises the clearer reason: pickle-only weights
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    config_json = _read_json(config_path)
    if not isinstance(config_json, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    saved_qc = config_json.get("quantization_config")
    if config is not None and saved_qc is not None:
        method = saved_qc.get("quant_method") if isinstance(saved_qc, dict) else saved_qc
        raise ConfigError(
            f"{folder} is already quantized (quant_method {method!r}); load it without config=, or "
            f"quantize its full-precision original",
            field="quant_method",
            value=method,
            allowed="a full-precision checkpoint",
        )
    if config is None and saved_qc is not None:
        if not isinstance(saved_qc, dict):
            raise CheckpointError(f"{config_path}: quantization_config must be an object, got {saved_qc!r}")
        with _naming(config_path):
            config = config_from_dict(saved_qc)
    prequantized = saved_qc is not None
    with _naming(config_path) if prequantized else contextlib.nullcontext():
        quantizer = AutoQuantizer.from_config(config) if config is not None else None
    if quantizer is not None and not prequantized and quantizer.needs_calibration():
        raise ConfigError(
            f"{type(quantizer.config).__name__} ({quantizer.config.quant_method}) needs calibration data, "
            f"which quantize-on-load cannot give it: load the full-precision model, then "
            f"quantplug.quantize(model, config, calibration_data=...)",
            field="calibration_data",
            value=None,
            allowed="a config that needs no calibration",
        )
    target = torch.device(device)
    if quantizer is not None:
        quantizer.validate_environment(target)

    ckpt = Checkpoint(folder)
    if model is None:
        model = _skeleton(folder, config_json, dtype, ckpt.most_common_float_dtype())
    names, _ = plan(model, quantizer.config, quantizer) if quantizer else ([], {})
    qset = set(names)

    # What the checkpoint must hold: every key, with its shape (and dtype where the backend says).
    expected: dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]] = {}
    model_state = model.state_dict()
    for key, t in model_state.items():
        if not _prefixes(key, qset):
            expected[key] = (tuple(t.shape), None)
    metas = {name: as_linear_meta(model.get_submodule(name)) for name in names}
    owned: dict[str, list[str]] = {}  # quantized module -> its checkpoint keys
    for name in names:
        if prequantized:
            spec = quantizer.expected_tensors(name, metas[name])
        else:
            spec = {k: (tuple(v.shape), None) for k, v in model.get_submodule(name).state_dict().items()}
        owned[name] = [f"{name}.{k}" for k in spec]
        expected.update({f"{name}.{k}": v for k, v in spec.items()})
    have = ckpt.keys()
    aliases = _aliases(folder, ckpt, model, expected)
    unexpected = have - set(expected)
    missing = set(expected) - have - set(aliases)
    if unexpected or missing:
        what = f"quant_method {quantizer.config.quant_method!r}" if prequantized else "the model"
        parts = []
        if missing:
            parts.append(f"missing tensors {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_fmt(unexpected)}")
        raise CheckpointError(f"{folder}: does not match what {what} implies: {'; '.join(parts)}")
    for key in sorted(have):
        shape, dt = expected[key]
        got_shape, got_dtype = ckpt.spec(key)
        if shape is not None and tuple(got_shape) != tuple(shape):
            raise CheckpointError(
                f"{folder}: tensor {key!r} has shape {list(got_shape)}, expected {list(shape)}"
            )
        if dt is not None and got_dtype != dt:
            raise CheckpointError(f"{folder}: tensor {key!r} has dtype {got_dtype}, expected {dt}")
        mine = model_state.get(key)
        if dt is None and mine is not None and not _compatible_dtype(got_dtype, mine.dtype):
            # full-precision floats may be stored in any float dtype (they are cast); nothing else
            raise CheckpointError(
                f"{folder}: tensor {key!r} has dtype {got_dtype}, expected "
                f"{'a floating-point dtype' if mine.dtype.is_floating_point else mine.dtype}"
            )

    if prequantized:  # the tensors fit the config; is it the config they were saved with?
        _check_recorded_config(config_path, ckpt, quantizer.config)

    float_dtype = dtype or (model.dtype if hasattr(model, "dtype") else None)

    def read(key: str, cast: bool) -> torch.Tensor:
        """A tensor (or the stored source of an alias) on the target device; full-precision
        floats are cast to the model's dtype, a quantized module's tensors stay as stored."""
        t = ckpt.read(aliases.get(key, key)).to(target)
        return t.to(float_dtype) if cast and float_dtype is not None and t.is_floating_point() else t

    with torch.no_grad(), progress_bar(len(expected), "loading", progress) as bar:
        for name in names:
            prefix = name + "."
            tensors = {k[len(prefix) :]: read(k, cast=not prequantized) for k in owned[name]}
            if prequantized:
                qmodule = quantizer.load_module(name, metas[name], tensors)
            else:
                orig = model.get_submodule(name)
                for k, t in tensors.items():
                    _assign(orig, k, t)
                qmodule = quantizer.quantize_module(name, as_linear(orig))
            set_submodule(model, name, qmodule)
            del tensors
            release_freed_memory()
            bar.update(len(owned[name]))
        done = {k for keys in owned.values() for k in keys}
        # Tied tensors whose source stays in full precision share its storage, so they go last.
        tied = {k for k, src in aliases.items() if k not in done and not _prefixes(src, qset)}
        for key in sorted(k for k in expected if k not in done and k not in tied):
            _assign(model, key, read(key, cast=True))
            bar.update(1)
        for key in sorted(tied):
            _assign_alias(model, key, aliases[key])
            bar.update(1)
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{folder}: tensors {_fmt(left)} were not in the checkpoint")
    model.to(target)
    if quantizer is not None:
        attach_info(model, QuantizedModelInfo(quantizer.config, quantizer, names))
        register_if_transformers_loaded()
    model.eval()
    return model


def _check_recorded_config(config_path: Path, ckpt: Checkpoint, config: QuantConfig) -> None:
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
        same = same and type(config).from_dict(data) == config
    except (json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{where}: header metadata quantization_config is corrupt ({exc})") from None
    if not same:
        raise CheckpointError(
            f"{config_path}: quantization_config {config.to_json(indent=None)} is not the config {where.name} "
            f"was saved with ({recorded}); restore config.json's quantization_config, or re-save the model"
        )


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


def _prefixes(key: str, qset: set[str]) -> list[str]:
    """The quantized module names that are dotted prefixes of ``key``."""
    parts = key.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in qset]


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
