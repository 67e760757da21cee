"""The safetensors header: read and validate it without torch.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data. ``read_header`` is the one parser of that header: ``safetensors_io.SafetensorsFile``
reads tensors through it, and model sizing (``select`` on a folder) reads dtypes and shapes from
it without importing torch. Every problem is a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from .errors import CheckpointError

#: dtype name in a header -> bytes per element (the names ``safetensors_io.DTYPES`` maps to torch)
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,  # powers of two (MX scales); torch >= 2.7
}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit
#: metadata key of the JSON object name -> CRC-32 of the tensor's bytes that quantplug writes
CHECKSUMS_KEY = "quantplug_crc32"


@dataclasses.dataclass(frozen=True)
class Header:
    """A validated header: every entry lies within the data and no two overlap."""

    path: Path
    metadata: dict[str, str]
    checksums: dict[str, int]
    """Recorded CRC-32 per tensor (empty for files written by other tools)."""
    entries: dict[str, tuple[str, tuple[int, ...], int, int]]
    """name -> (dtype name such as ``"F32"``, shape, begin, end); offsets relative to ``data_start``."""
    data_start: int


def bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}")


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of the safetensors file at ``path`` (the data is not read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(path, f"file is {size} bytes, too short to be safetensors")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                if head[:1] == b"\x80" or head[:2] == b"PK":
                    raise bad(
                        path, "this is a pickle / torch.save file, not safetensors; refusing to unpickle it"
                    )
                raise bad(
                    path,
                    f"header length {n} does not fit in a {size}-byte file (truncated or not safetensors)",
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(path, f"header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise bad(path, "header is not a JSON object; the file is corrupt")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise bad(path, "__metadata__ is not a JSON object")
    checksums = _checksums(path, meta)
    data_start = 8 + n
    return Header(path, meta, checksums, _entries(path, header, size - data_start), data_start)


def _checksums(path: Path, meta: dict[str, str]) -> dict[str, int]:
    if CHECKSUMS_KEY not in meta:
        return {}
    try:
        checksums = json.loads(meta[CHECKSUMS_KEY])
    except (TypeError, json.JSONDecodeError):
        checksums = None
    if not isinstance(checksums, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in checksums.values()
    ):
        raise bad(path, f"metadata {CHECKSUMS_KEY} is not a JSON object of checksums; the file is corrupt")
    return checksums


def _entries(path: Path, header: dict, data_len: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    spans = []
    for name, e in header.items():
        try:
            itemsize, shape, (begin, end) = DTYPE_SIZES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            ok = (
                all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
            )
        except (KeyError, TypeError, ValueError):
            raise bad(path, f"tensor {name!r}: malformed header entry {e!r}") from None
        if not ok:
            raise bad(path, f"tensor {name!r}: malformed shape or offsets in {e!r}")
        nbytes = math.prod(shape) * itemsize
        if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
            raise bad(
                path,
                f"tensor {name!r}: offsets [{begin}, {end}] do not match its shape {list(shape)} and dtype "
                f"{e['dtype']} ({nbytes} bytes) within {data_len} data bytes (truncated or corrupt)",
            )
        entries[name] = (e["dtype"], shape, begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise bad(path, f"tensors {n0!r} and {n1!r} overlap; the file is corrupt")
    return entries
