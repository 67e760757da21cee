"""Byte sizes: parse ``"5GB"`` / ``"500MiB"`` and format bytes for people. No heavy imports."""

from __future__ import annotations

import re


def parse_size(size: int | float | str, what: str = "size") -> int:
    """``"5GB"`` (10^9), ``"5GiB"`` (2^30), ``"500MB"``, ``1000`` -> bytes. Raises ``ValueError``
    naming ``what`` for anything else."""
    if isinstance(size, bool):
        raise ValueError(f"{what} {size!r} is not a size like '5GB', '500MiB' or a number of bytes")
    if isinstance(size, (int, float)):
        if size <= 0:
            raise ValueError(f"{what} must be positive, got {size!r}")
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"{what} {size!r} is not a size like '5GB', '500MiB' or a number of bytes")
    base = 1024 if m.group(3) else 1000
    value = int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return value


def fmt_bytes(n: float | None) -> str:
    """``3_620_000_000`` -> ``"3.62 GB"`` (powers of 1000, as disk and model sizes are quoted)."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
