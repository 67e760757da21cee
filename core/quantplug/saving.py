"""``save``: write a model (quantized by quantplug, or full precision) as a checkpoint folder.

The write is atomic: it goes into a temporary folder beside the target, which is swapped in with
one rename only once every file is complete and fsynced, so a crash mid-save leaves the previous
checkpoint intact; other files already in the target folder (a tokenizer, a README) are carried over.
A killed save's temporary folder is removed by the next successful save to the same path, once its
process (named in the folder's name) no longer exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    OWN_FILES,
    WEIGHTS_NAME,
    header_metadata,
)
from .errors import CheckpointError, PluginError
from .experts_contract import site_tensors
from .kernel_layer import source_module
from .safetensors_io import CHECKSUMS_KEY, write_file
from .sites import checkpoint_layout, checkpoint_namer
from .sizes import parse_size
from .walk import QuantizedModelInfo, quantized_info


def checkpoint_tensors(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """The tensors to store, in model order, and aliases (tied tensors stored once): alias -> kept."""
    info = quantized_info(model)
    qnames = set(info.modules) if info else set()
    out: list[tuple[str, torch.Tensor]] = []
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    offloaded = len(placed) > 1 or "disk" in placed  # accelerate's hooks hold some tensors

    def add(key: str, t: torch.Tensor) -> None:
        if t.device.type == "meta" and offloaded:
            raise CheckpointError(
                f"tensor {key!r} is offloaded by accelerate (the model was loaded with a device_map); "
                f"quantplug.save needs every tensor in memory: load it with device= to save it"
            )
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
            module = source_module(info.quantizer, name, module)  # (a kernel's layer: the backend's, rebuilt)
            for k, t in site_tensors(info.quantizer, name, module, info.experts).items():
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
        old = final.with_name(f".{final.name}.quantplug-old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    _fsync_dir(final.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process; or not a pid
        return pid > 0
    return True


def _remove_stale(final: Path) -> None:
    """Remove the temporary folders (``.{name}.quantplug-tmp-{pid}-{hex}``, ``...-old-{pid}-{hex}``)
    that saves to ``final`` left when their process was killed. A folder whose process still runs
    (a concurrent save) is never touched; nor is one without a pid in its name (a legacy ``old``)."""
    prefix = f".{final.name}.quantplug-"
    with contextlib.suppress(OSError):
        for entry in final.parent.iterdir():
            kind, _, rest = entry.name.removeprefix(prefix).partition("-")
            pid, _, token = rest.partition("-")
            if not entry.name.startswith(prefix) or kind not in ("tmp", "old") or not token:
                continue
            if pid.isdigit() and not _pid_alive(int(pid)) and not entry.is_symlink() and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` every file of ``old`` that is not part of a checkpoint."""
    for entry in old.iterdir():
        if OWN_FILES.match(entry.name) or (new / entry.name).exists():
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
    info = quantized_info(model)
    if info is not None and not info.quantizer.backend.capabilities.serializable:
        notes = info.quantizer.backend.notes
        raise CheckpointError(
            f"backend {info.config.quant_method!r} declares that its models cannot be saved"
            + (f" ({notes})" if notes else "")
        )
    tensors, aliases = checkpoint_layout(  # MoE: as Transformers saves
        model, *checkpoint_tensors(model), native=info.experts if info else None
    )
    meta = _file_metadata(model, info, aliases, [key for key, _ in tensors])
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.quantplug-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_folder(tmp, model, info, _shards(tensors, limit), meta)
        for extra in extra_files:
            extra = Path(extra)
            if OWN_FILES.match(extra.name):
                raise CheckpointError(f"extra file {extra} would overwrite a checkpoint file; rename it")
            shutil.copy2(extra, tmp / extra.name)
        if final.is_dir():
            _carry_over(final, tmp)
        _fsync_dir(tmp)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale(final)  # after the swap: a save that fails leaves what it found
    return final


def _file_metadata(
    model: nn.Module, info: QuantizedModelInfo | None, aliases: dict[str, str], stored: list[str]
) -> dict[str, str]:
    """The header metadata of every file: quantplug's own, the backend's ``checkpoint_metadata``
    (checked: strings that do not clash with quantplug's keys) and the aliases of tied tensors."""
    meta = header_metadata(info)
    if info is not None:
        rename = checkpoint_namer(model)
        q = info.quantizer
        extra = q.checkpoint_metadata(
            {rename(n): source_module(q, n, model.get_submodule(n)) for n in info.modules}, stored
        )
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
    return meta


def _shards(tensors: list[tuple[str, torch.Tensor]], limit: int) -> list[list[tuple[str, torch.Tensor]]]:
    """``tensors`` in order, cut into shards of at most ``limit`` bytes (a larger tensor alone)."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in tensors:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += n
    return shards


def _write_folder(
    tmp: Path,
    model: nn.Module,
    info: QuantizedModelInfo | None,
    shards: list[list[tuple[str, torch.Tensor]]],
    meta: dict[str, str],
) -> None:
    """Write config.json, generation_config.json, the weights (and index) into ``tmp``, fsynced."""
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
