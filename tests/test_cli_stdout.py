"""Every command's stdout holds only its product, whatever the installed backend libraries print
(issue 28): each command runs in a fresh process with every plugin of this environment installed
(all of them in the ``integration`` env) plus ``test-loud``, a plugin that prints in every way a
library can (``print``, a logging handler that captured ``sys.stdout`` at import, a write to file
descriptor 1, C stdio, a subprocess) when it is imported and when it quantizes. stdout must parse
(``json.loads`` for ``--json``) or be exactly the table, and the noise must be on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import quantplug
from quantplug.testing import tiny_llama

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the test plugin prints through libc")

LOUD = textwrap.dedent(
    """
    import ctypes
    import dataclasses
    import logging
    import os
    import subprocess
    import sys

    import quantplug

    _log = logging.getLogger("quantplug_test_loud")
    _log.addHandler(logging.StreamHandler(sys.stdout))  # captured at import, as libraries do
    _log.setLevel(logging.INFO)
    _log.propagate = False


    def shout(where):
        print(f"LOUD-print {where}")
        _log.info("LOUD-log %s", where)
        os.write(1, f"LOUD-fd1 {where}\\n".encode())
        ctypes.CDLL(None).puts(f"LOUD-C {where}".encode())  # held in C stdio's buffer on a pipe
        subprocess.run([sys.executable, "-S", "-c", f"print('LOUD-subprocess {where}')"], check=True)


    shout("import")


    @dataclasses.dataclass(frozen=True)
    class Config(quantplug.QuantConfig):
        quant_method = "test-loud"
        bits: int = 16


    @quantplug.hookimpl
    def register_backends(register):
        register(
            quantplug.Backend(
                name="test-loud",
                config=Config,
                quantizer="quantplug_test_loud_q:LoudQuantizer",
                capabilities=quantplug.Capabilities(bits=(16,), devices=("cpu",)),
                presets=(quantplug.Preset("fp16", {"bits": 16}, bits=16, bits_per_weight=16, rel_error=0.001),),
            )
        )
    """
)

LOUD_QUANTIZER = textwrap.dedent(
    """
    import torch

    import quantplug
    from quantplug_test_loud import shout


    class HalfLinear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("weight", linear.weight.detach().to(torch.float16))
            self.bias = linear.bias

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


    class LoudQuantizer(quantplug.Quantizer):
        shouted = False

        def quantize_module(self, name, module):
            if not LoudQuantizer.shouted:
                LoudQuantizer.shouted = True
                shout("quantize")
            return HalfLinear(module)

        def empty_module(self, name, module):
            return HalfLinear(module)
    """
)

NOISE = ("LOUD-print", "LOUD-log", "LOUD-fd1", "LOUD-C", "LOUD-subprocess")


@pytest.fixture(scope="module")
def loud_site(tmp_path_factory) -> Path:
    """A folder for PYTHONPATH holding the installed ``test-loud`` plugin (a hand-written dist-info)."""
    site = tmp_path_factory.mktemp("loud_site")
    (site / "quantplug_test_loud.py").write_text(LOUD)
    (site / "quantplug_test_loud_q.py").write_text(LOUD_QUANTIZER)
    info = site / "quantplug_test_loud-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: quantplug-test-loud\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[quantplug]\ntest-loud = quantplug_test_loud\n")
    return site


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture
def run(loud_site, subprocess_env, tmp_path):
    """``run(*args)``: ``quantplug ARGS`` in a fresh process with test-loud installed and an empty
    cache folder of its own (bench-presets writes there; a plugin descriptor cache would spare the
    plugins' import); stdout and stderr as text."""
    runs = []

    def run_(*args: str) -> subprocess.CompletedProcess:
        runs.append(args)
        env = subprocess_env(loud_site, QUANTPLUG_CACHE_DIR=str(tmp_path / f"cache-{len(runs)}"))
        return subprocess.run(
            [sys.executable, "-m", "quantplug.cli", *args],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )

    return run_


def _clean(proc: subprocess.CompletedProcess, *, when: tuple[str, ...] = ("import",)) -> str:
    """stdout, once it is shown to hold none of test-loud's noise, which went to stderr."""
    for kind in NOISE:
        assert kind not in proc.stdout, f"{kind} on stdout:\n{proc.stdout[:3000]}"
        for where in when:
            assert f"{kind} {where}" in proc.stderr, (
                f"{kind} {where} missing from stderr:\n{proc.stderr[-3000:]}"
            )
    return proc.stdout


def _backends() -> dict[str, bool]:
    """This environment's backends (name: available), test-loud included."""
    return {b.name: b.available for b in quantplug.backends()} | {"test-loud": True}


def test_list(run):
    proc = run("list", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(_clean(proc))
    names = [b["name"] for b in data["backends"]]
    assert {b["name"]: b["available"] for b in data["backends"]} == _backends()
    proc = run("list")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _clean(proc).splitlines()
    assert lines[0].split() == ["backend", "plugin", "library", "status", "capabilities"]
    assert [line.split()[0] for line in lines[1 : 1 + len(names)]] == names
    assert all(line.startswith(("note: ", "ambiguous: ", "kernels: ")) for line in lines[1 + len(names) :]), (
        lines
    )


def test_doctor(run):
    proc = run("doctor")
    lines = _clean(proc).splitlines()
    assert lines[0].startswith("quantplug ") and ", Python " in lines[0]
    plugins = [line for line in lines if line.startswith("  plugin ")]
    assert any(line.startswith("  plugin test-loud [quantplug-test-loud 0.0.1]: loaded") for line in plugins)
    assert len(plugins) == len(quantplug.plugins()) + 1, lines
    if proc.returncode == 0:
        assert lines[-1] == "No problems found.", lines
    else:
        assert proc.returncode == 1 and "problem(s):" in proc.stdout, proc.stderr[-3000:]


def test_select(run, model_dir):
    proc = run("select", str(model_dir), "--device", "cpu", "--calibration-data", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(_clean(proc))
    labels = [f"{c['backend']}:{c['preset']}" for c in data["candidates"]]
    assert "test-loud:fp16" in labels
    proc = run("select", str(model_dir), "--device", "cpu", "--calibration-data")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _clean(proc).splitlines()
    assert lines[0].startswith("device: ") and lines[1] == f"model: {data['model']['source']}"
    ranked = [line.split()[1] for line in lines if line[:3].strip().rstrip(".").isdigit()]
    assert ranked == labels


def test_quantize_and_export(run, model_dir, tmp_path):
    out = tmp_path / "rtn-int8"
    proc = run("quantize", str(model_dir), "-m", "rtn", "-b", "8", "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = _clean(proc).splitlines()
    assert line.startswith("quantized 14 module(s) with rtn ") and line.endswith(" MiB of weights)")
    assert (out / "config.json").exists()

    ct = tmp_path / "ct"
    proc = run("export", str(out), "-f", "compressed-tensors", "-o", str(ct), "--no-progress")
    if _backends().get("compressed-tensors"):
        assert proc.returncode == 0, proc.stderr[-3000:]
        (line,) = _clean(proc).splitlines()
        assert line.startswith(f"exported {out} as compressed-tensors ") and line.endswith(f"wrote {ct}")
    else:  # an error: nothing on stdout, the message on stderr
        assert proc.returncode == 1 and _clean(proc) == "", proc.stdout
        assert "Error: " in proc.stderr


SMALL = ("--tokens", "96", "--decode-tokens", "2", "--repeats", "1", "--calibration-tokens", "64")


def test_compare_json_with_every_backend(run, model_dir, tmp_path):
    """One candidate per backend, so every installed library is imported and quantizes (GPTQModel's
    banner and log lines among them, where it is installed)."""
    out = tmp_path / "out"
    args = ("compare", str(model_dir), "--per-backend", "1", "--dtype", "float32", *SMALL)
    proc = run(*args, "--json", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(_clean(proc, when=("import", "quantize")))
    assert data == json.loads((out / "comparison.json").read_text())
    rows = {r["backend"]: r for r in data["rows"][1:]}
    assert "test-loud" in rows and "rtn" in rows
    if _backends().get("gptq"):
        assert "gptq" in rows and rows["gptq"]["error"] is None, rows.get("gptq")
        assert "GPT-QModel" not in proc.stdout and "GPT-QModel" in proc.stderr  # its banner


def test_compare_table(run, model_dir, tmp_path):
    out = tmp_path / "out"
    args = ("compare", str(model_dir), "-c", "test-loud", "--dtype", "float32", *SMALL)
    proc = run(*args, "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = _clean(proc, when=("import", "quantize"))
    data = json.loads((out / "comparison.json").read_text())
    lines = stdout.splitlines()
    assert lines[0].startswith("| candidate | dtype | kernel |") and lines[1] == "|" + "---|" * 11
    labels = [r["label"] for r in data["rows"]]
    assert [line.split(" | ")[0] for line in lines[2 : 2 + len(labels)]] == [f"| {x}" for x in labels]
    assert lines[2 + len(labels)] == "" and stdout.rstrip().endswith(data["recommendation"].rstrip())


def test_bench_presets(run, tmp_path):
    args = ("bench-presets", "--shape", "64x64", "-c", "test-loud", "--budget", "0")
    proc = run(*args, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(_clean(proc, when=("import", "quantize")))
    assert set(data["presets"]) == {"test-loud:fp16"} and data["path"] in proc.stderr
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _clean(proc, when=("import", "quantize")).splitlines()
    assert lines[0].startswith("machine: ") and lines[1].startswith("layers: 64x64 x ")
    assert [line.split()[0] for line in lines[4:]] == ["test-loud:fp16"]
