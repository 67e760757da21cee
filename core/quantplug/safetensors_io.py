"""Streaming safetensors files: write and read one tensor at a time, with strict validation.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data. Files written here are read by ``safetensors.safe_open`` and vice versa. The header
is parsed and validated by ``safetensors_header`` (torch-free, shared with model sizing).

Reading uses plain file reads, not mmap, so the memory it holds is only the tensors asked for
(a whole-file mmap counts the file's pages in the process's resident memory). No pickle anywhere.

Every file written here records a CRC-32 of each tensor's bytes in its metadata (``quantplug_crc32``,
a JSON object name -> checksum), and reading a tensor verifies it: a flipped or zeroed data byte is a
``CheckpointError`` naming the tensor, not a model that silently computes something else. Files
without that entry (written by other tools) are read unverified, as every safetensors reader does.
"""

from __future__ import annotations

import ctypes
import json
import os
import zlib
from collections.abc import Iterable

import torch

from .errors import CheckpointError
from .safetensors_header import CHECKSUMS_KEY, MAX_HEADER, bad, read_header

#: the header's dtype names (``safetensors_header.DTYPE_SIZES``, same keys) -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):  # torch >= 2.7
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

__all__ = ["CHECKSUMS_KEY", "DTYPES", "MAX_HEADER", "NAMES", "SafetensorsFile", "write_file"]


def _buffer(t: torch.Tensor):
    """A zero-copy writable buffer over a contiguous CPU tensor's bytes."""
    n = t.numel() * t.element_size()
    return (ctypes.c_char * n).from_address(t.data_ptr())


def write_file(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``(name, tensor)`` pairs to ``path``, fsynced. Returns the bytes of tensor data written.
    The metadata gets ``quantplug_crc32``: each tensor's CRC-32, checked when it is read."""
    items = []
    checksums: dict[str, int] = {}
    offset = 0
    for name, t in tensors:
        if t.dtype not in NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            raise CheckpointError(
                f"tensor {name!r} is a {type(t).__name__} (a tensor subclass); the backend's module_tensors() "
                f"must flatten it to plain tensors"
            )
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        checksums[name] = zlib.crc32(_buffer(t)) if n else 0
        items.append((name, t, offset, offset + n))
        offset += n
    header: dict[str, object] = {}
    header["__metadata__"] = {str(k): str(v) for k, v in (metadata or {}).items()}
    header["__metadata__"][CHECKSUMS_KEY] = json.dumps(checksums, separators=(",", ":"))
    for name, t, begin, end in items:
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t, _, _ in items:
            if t.numel():
                f.write(_buffer(t))
        f.flush()
        os.fsync(f.fileno())
    return offset


class SafetensorsFile:
    """A safetensors file opened for reading single tensors; the header is validated on open
    (by ``safetensors_header.read_header``)."""

    def __init__(self, path: str | os.PathLike):
        header = read_header(path)
        self.path = header.path
        self.metadata: dict[str, str] = header.metadata
        self.checksums: dict[str, int] = header.checksums
        self.data_start = header.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            name: (DTYPES[dtype], shape, begin, end)
            for name, (dtype, shape, begin, end) in header.entries.items()
        }

    def _bad(self, why: str) -> CheckpointError:
        return bad(self.path, why)

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_index(self, name: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of one tensor, reading only those bytes (e.g. one expert of a stacked
        experts tensor). The whole tensor's recorded checksum cannot be checked on a part of it."""
        dtype, shape, begin, end = self.entries[name]
        if not shape or not 0 <= index < shape[0]:
            raise self._bad(f"tensor {name!r} of shape {list(shape)} has no index {index}")
        out = torch.empty(shape[1:], dtype=dtype)
        size = (end - begin) // shape[0]
        if size:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.data_start + begin + index * size)
                    got = f.readinto(_buffer(out))
            except OSError as exc:
                raise CheckpointError(f"{self.path}: reading tensor {name!r} failed: {exc}") from exc
            if got != size:
                raise self._bad(f"tensor {name!r}: file ended after {got} of {size} bytes (truncated)")
        return out

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh CPU memory."""
        dtype, shape, begin, end = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.data_start + begin)
                    got = f.readinto(_buffer(out))
            except OSError as exc:
                raise CheckpointError(f"{self.path}: reading tensor {name!r} failed: {exc}") from exc
            if got != end - begin:
                raise self._bad(f"tensor {name!r}: file ended after {got} of {end - begin} bytes (truncated)")
        expected = self.checksums.get(name)
        if expected is not None:
            crc = zlib.crc32(_buffer(out)) if end > begin else 0
            if crc != expected:
                raise self._bad(
                    f"tensor {name!r}: its data does not match the checksum recorded when it was saved "
                    f"(crc32 {crc:08x}, recorded {expected:08x}); the file is corrupt: save or copy it again"
                )
        return out
