"""Shared helpers of the fault suite: run sizes (CI or long), the count log, and tiny quantized
models of every installed backend.

Sizes: the CI-sized suite runs by default; ``QUANTPLUG_FAULTS_LONG=1`` selects the long run (the
variable is read once, at import: the core conftest clears QUANTPLUG_* variables around each test).
``QUANTPLUG_FAULTS_COUNTS=<file>`` appends one JSON line per counted test to that file, which is
where the figures in tests/faults/README.md come from.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

LONG = os.environ.get("QUANTPLUG_FAULTS_LONG", "") not in ("", "0")
COUNTS_FILE = os.environ.get("QUANTPLUG_FAULTS_COUNTS") or None

# A cheap config of each backend this project ships, for tiny checkpoints; a backend installed from
# elsewhere gets its config class's defaults.
CHEAP_CONFIGS: dict[str, dict[str, Any]] = {
    "rtn": {"bits": 4, "group_size": 32},
    "bitsandbytes": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "hqq": {"nbits": 4, "group_size": 64},
    "quanto": {"weights": "int8"},
    "torchao": {},
    "gptq": {"bits": 4, "group_size": 32},
    "compressed-tensors": {"scheme": "W4A16_ASYM", "group_size": 32},
}


def size(ci: int, long: int) -> int:
    """``long`` in the long run, ``ci`` otherwise."""
    return long if LONG else ci


def record(test: str, **counts: Any) -> None:
    """Print a test's counts (seen with ``-s``) and append them to QUANTPLUG_FAULTS_COUNTS."""
    line = json.dumps({"test": test, "long": LONG, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ"), **counts})
    print(f"\n[faults] {line}")
    if COUNTS_FILE:
        with open(COUNTS_FILE, "a") as f:
            f.write(line + "\n")


def installed_methods() -> list[str]:
    """quant_method of every installed backend that is available here, quantizes a Llama and saves
    it (the fault tests corrupt, reload and share its checkpoints), sorted. Left out: load-only
    backends such as awq, eetq (its save is refused: quantplug-gpu-formats' tests cover it), and backends whose presets all declare other
    architectures (``Preset.model_types``: mxfp4 is gpt-oss's experts format and refuses a Llama;
    quantplug-float's tests/test_mxfp4.py covers its checkpoints, corrupt ones included)."""
    import quantplug

    def takes_llama(backend) -> bool:
        tied = [p.model_types for p in backend.presets]
        return not tied or any(not types or "llama" in types for types in tied)

    return sorted(
        b.config.quant_method
        for b in quantplug.backends()
        if b.available and b.capabilities.quantizes and b.capabilities.serializable and takes_llama(b)
    )


def cheap_config(method: str):
    import quantplug

    return quantplug.config_from_dict({"quant_method": method, **CHEAP_CONFIGS.get(method, {})})


def quantized_llama(method: str, seed: int = 0):
    """A tiny random-weight Llama quantized with ``method``'s cheap config."""
    import quantplug
    from quantplug.testing import tiny_llama

    model = tiny_llama(seed)
    config = cheap_config(method)
    calibration = None
    if quantplug.AutoQuantizer.from_config(config).needs_calibration():
        from quantplug.testing import token_ids

        calibration = [token_ids(model.config.vocab_size, (2, 16), seed=seed + 50 + i) for i in range(2)]
    quantplug.quantize(model, config, progress=False, calibration_data=calibration)
    return model


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def read_all(file: Path) -> dict:
    """Every tensor of a safetensors file, copied out of its memory map (so the file may be rewritten)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(file).items()}


def rewrite(file: Path, change) -> None:
    """Rewrite a safetensors file with ``change(tensors)`` applied, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(file, "pt") as f:
        meta = f.metadata()
    tensors = read_all(file)
    change(tensors)
    save_file(tensors, file, metadata=meta)
