"""Checks the conformance kits share (``quantplug.testing``): a load in a fresh interpreter, and
that listing backends and validating a config import neither torch nor the backend's library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import quantplug


def load_and_dump(checkpoint: Path, ids_file: Path, out_file: Path) -> None:
    """Run in a fresh interpreter: load the checkpoint, write its logits for the ids in ``ids_file``."""
    script = textwrap.dedent(
        f"""
        import torch, quantplug
        from safetensors.torch import load_file, save_file
        ids = load_file({str(ids_file)!r})["ids"]
        model = quantplug.load({str(checkpoint)!r}, progress=False)
        with torch.no_grad():
            save_file({{"logits": model(ids).logits.contiguous()}}, {str(out_file)!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, f"loading in a fresh process failed:\n{proc.stderr[-4000:]}"


def assert_listing_is_light(
    backend_name: str, config: dict[str, Any], library_modules: Iterable[str]
) -> None:
    """Listing backends and validating ``config`` imports neither torch, the backend's library nor
    its quantizer's module (checked in a fresh interpreter)."""
    backend = quantplug.get_backend(backend_name)
    heavy = {"torch", *library_modules, backend.quantizer.partition(":")[0]}
    script = textwrap.dedent(
        f"""
        import json, os, sys; os.environ["QUANTPLUG_PLUGIN_CACHE"] = "0"  # imports the entry point
        import quantplug; quantplug.backends()
        quantplug.config_from_dict(json.loads({json.dumps({"quant_method": backend_name, **config})!r}))
        heavy = {sorted(heavy)!r}
        print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    roots = sorted({h for h in heavy for m in imported if m == h or m.startswith(h + ".")})
    assert not imported, (
        f"listing backends and validating a {backend_name!r} config imported heavy module(s): "
        f"{', '.join(roots)} ({len(imported)} modules: {', '.join(imported[:8])}"
        f"{', ...' if len(imported) > 8 else ''}). Fix: import them only in the quantizer's module "
        f"({backend.quantizer}) or inside functions, never at the top of the plugin's package or "
        f"config module (`python -X importtime -c 'import quantplug; quantplug.backends()'` shows who)."
    )
