"""``quantplug.compare`` and ``quantplug compare``: every candidate measured on a real (tiny, random)
Transformers model; a failing candidate is reported and the others complete."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import quantplug
from quantplug.compare_settings import bf16_native
from quantplug.comparison import compare, to_markdown
from quantplug.recommendation import candidates
from quantplug.testing import tiny_llama


class HalfLinear(nn.Module):
    """A third-party 'backend': weights stored in fp16, computed in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.float16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


class HalfQuantizer(quantplug.Quantizer):
    def quantize_module(self, name, module):
        return HalfLinear(module)

    def empty_module(self, name, module):
        return HalfLinear(module)


class LoudLinear(HalfLinear):
    def forward(self, x):
        logging.getLogger("tp_loud.kernels").warning("casting %s to float16", x.dtype)
        warnings.warn("slow path", UserWarning, stacklevel=1)
        return super().forward(x)


class LoudQuantizer(HalfQuantizer):
    def quantize_module(self, name, module):
        return LoudLinear(module)


class BrokenQuantizer(quantplug.Quantizer):
    def quantize_module(self, name, module):
        raise RuntimeError(f"simulated kernel failure in {name}")


def _backend(name: str, quantizer: str) -> quantplug.Backend:
    @dataclasses.dataclass(frozen=True)
    class Config(quantplug.QuantConfig):
        quant_method = name
        bits: int = 16

    return quantplug.Backend(
        name=name,
        config=Config,
        quantizer=f"{__name__}:{quantizer}",
        capabilities=quantplug.Capabilities(bits=(16,), devices=("cpu",)),
        presets=(quantplug.Preset("fp16", {"bits": 16}, bits=16, bits_per_weight=16, rel_error=0.001),),
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(path)
    return path


# one dtype (float32): the unquantized bfloat16 row compare adds by default is tested on its own
SMALL = {"tokens": 96, "window": 32, "decode_tokens": 2, "repeats": 1, "dtype": "float32"}


def test_compare_measures_each_candidate_and_reports_a_failure(rtn_only):
    quantplug.register_backend(_backend("tp-half", "HalfQuantizer"))
    quantplug.register_backend(_backend("tp-broken", "BrokenQuantizer"))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare(model, ["rtn:int8", "tp-broken:fp16", "rtn:int4-g128", "tp-half"], **SMALL)

    assert all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # the caller's model untouched
    assert [r.label for r in result.rows] == [
        "unquantized", "rtn:int8", "tp-broken:fp16", "rtn:int4-g128", "tp-half:fp16"
    ]  # fmt: skip
    base, int8, broken, int4, half = result.rows
    assert "simulated kernel failure" in broken.error and broken.acceptable is False
    for row in (base, int8, int4, half):
        assert row.error is None
        assert math.isfinite(row.perplexity) and row.prefill_ms > 0 and row.decode_ms > 0
    assert base.weight_bytes > half.weight_bytes > int8.weight_bytes > int4.weight_bytes
    assert half.weight_bytes * 2 == base.weight_bytes  # fp32 -> fp16, exactly
    assert 0 < int8.output_rel_error < int4.output_rel_error
    assert half.output_rel_error < 1e-3 and abs(half.perplexity / base.perplexity - 1) < 1e-3
    assert int8.quantize_seconds > 0
    assert "Failed: tp-broken:fp16" in result.recommendation
    assert result.recommended in {"rtn:int8", "rtn:int4-g128", "tp-half:fp16"}
    text = result.table()
    assert "failed: RuntimeError: simulated kernel failure" in text and "| unquantized |" in text
    data = json.loads(json.dumps(result.to_dict()))  # JSON-ready
    assert len(data["rows"]) == 5 and data["rows"][2]["error"].startswith("RuntimeError")


def test_default_candidates_come_from_select_and_top_limits_them(rtn_only, model_dir):
    result = compare(model_dir, top=2, **SMALL)
    ranking = [c.label for c in quantplug.select(model_dir, device="cpu").candidates]
    assert [r.label for r in result.rows[1:]] == ranking[:2]
    assert [r.select_rank for r in result.rows[1:]] == [1, 2]
    assert result.settings["encoding"].startswith("no tokenizer")


def test_recommendation_respects_the_quality_limit(rtn_only):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    strict = compare(model, ["rtn:int8", "rtn:int4-g128"], inputs=x, repeats=1, max_quality_loss=0.0)
    assert not any(r.acceptable for r in strict.rows[1:])  # output error > 0 for any quantization
    assert strict.recommended is None and "Stay unquantized" in strict.recommendation
    loose = compare(
        model, ["rtn:int8", "rtn:int4-g128"], inputs=x, repeats=1, max_quality_loss=1.0, priority="size"
    )
    assert loose.recommended == "rtn:int4-g128"  # both acceptable: the smaller wins
    quality = compare(
        model, ["rtn:int8", "rtn:int4-g128"], inputs=x, repeats=1, max_quality_loss=1.0, priority="quality"
    )
    assert quality.recommended == "rtn:int8"


def test_a_model_without_a_vocabulary_is_scored_by_output_error(rtn_only):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    result = compare(model, ["rtn:int8", "rtn:int4-g128"], inputs=x, repeats=1)
    (base, *_), (int8, int4) = result.rows, candidates(result.rows)  # with a bfloat16 baseline where native
    assert base.perplexity is None and base.decode_ms is None and base.prefill_ms > 0
    assert 0 < int8.output_rel_error < int4.output_rel_error < 0.5
    with pytest.raises(quantplug.ConfigError, match="inputs="):
        compare(model, ["rtn:int8"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": ["rtn:int3"]}, "no preset 'int3'"),
        ({"candidates": ["nope"]}, "nope"),
        ({"tokens": 1}, "tokens"),
        ({"repeats": 0}, "repeats"),
        ({"max_quality_loss": -1}, "max_quality_loss"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, match, rtn_only):
    with pytest.raises(quantplug.QuantplugError, match=match):
        compare(tiny_llama(), **kwargs)


def test_an_already_quantized_model_is_refused(rtn_only):
    model = tiny_llama()
    quantplug.quantize(model, {"quant_method": "rtn", "bits": 8}, progress=False)
    with pytest.raises(quantplug.ConfigError, match="already quantized"):
        compare(model, ["rtn:int8"])


def test_cli_compare_writes_json_markdown_and_a_plot(model_dir, tmp_path, subprocess_env):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "plot.png"
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "quantplug.cli", "compare", str(model_dir),
            "-c", "rtn:int8", "-c", "rtn:int4-g128", "-c", "rtn:int2-g32-asym",
            "--tokens", "96", "--decode-tokens", "2", "--repeats", "1",
            "--json", "--plot", str(plot), "--out-dir", str(out),
        ],
        capture_output=True, text=True, timeout=300, env=subprocess_env(QUANTPLUG_PLUGINS="rtn"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    rows = data["rows"]
    bf16 = ["unquantized (bfloat16)"] if bf16_native(torch.device("cpu")) else []
    assert [r["label"] for r in rows] == [
        "unquantized",
        *bf16,
        "rtn:int8",
        "rtn:int4-g128",
        "rtn:int2-g32-asym",
    ]
    # each in the dtype its preset is built for (the fused-kernel presets in bfloat16)
    assert [r["dtype"] for r in rows] == [
        "float32",
        *(["bfloat16"] * len(bf16)),
        "bfloat16",
        "bfloat16",
        "float32",
    ]
    for r in rows:
        assert r["weight_bytes"] > 0 and math.isfinite(r["perplexity"])
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0
    assert "[1/3] rtn:int8" in proc.stderr  # progress on stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert json.loads((out / "comparison.json").read_text())["rows"] == rows
    md = (out / "comparison.md").read_text()
    assert md.startswith("# quantplug compare") and "| rtn:int4-g128 |" in md and "Versions:" in md


def test_markdown_report_lists_backend_warnings(rtn_only):
    result = compare(tiny_llama(), ["rtn:int8"], **SMALL)
    result.rows[1].warnings = ["UserWarning: simulated"]
    assert "rtn:int8: UserWarning: simulated" in to_markdown(result)
    # a long warning is cut at a word, marked, and a code span the cut opened is closed (issue 18)
    long = (
        "UserWarning: inputs are cast from `torch.float32 to float16 "
        + "because the kernel wants it " * 10
        + "`"
    )
    result.rows[1].warnings = [long + "\nsecond line"]
    line = next(x for x in to_markdown(result).splitlines() if "Warnings raised by backends" in x)
    shown = line.split("rtn:int8: ", 1)[1]
    assert shown.endswith(" …`") and shown.count("`") == 2 and len(shown) < 170
    assert "second line" not in line and "because the kernel wants it" in shown


def test_every_installed_backend_gets_a_row_and_a_failure_does_not_stop_them(model_dir, tmp_path):
    """With whatever plugins this environment has (rtn alone in `core`, all five in `integration`)."""
    quantplug.register_backend(_backend("tp-broken", "BrokenQuantizer"))
    result = compare(model_dir, per_backend=1, **SMALL)
    cpu_backends = {
        c.backend
        for c in quantplug.select(
            model_dir, device="cpu", calibration_data=True
        ).candidates  # compare has text
        if c.backend != "tp-broken"
    }
    rows = result.rows[1:]
    assert {r.backend for r in rows} == cpu_backends | {"tp-broken"}
    assert len(rows) == len({r.backend for r in rows})  # one per backend
    for r in rows:
        if r.backend == "tp-broken":
            assert "simulated kernel failure" in r.error
        else:
            assert r.error is None, r.error
            assert r.weight_bytes < result.baseline.weight_bytes and math.isfinite(r.perplexity)
    png = result.plot(tmp_path / "all.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_backend_warnings_and_log_records_are_collected_once_per_row(rtn_only, capfd):
    quantplug.register_backend(_backend("tp-loud", "LoudQuantizer"))
    result = compare(tiny_llama(), ["tp-loud"], **SMALL)
    row = result.rows[1]
    assert row.error is None
    assert row.warnings.count("tp_loud.kernels: casting torch.float32 to float16") == 1
    assert row.warnings.count("UserWarning: slow path") == 1
    err = capfd.readouterr().err
    assert err.count("casting torch.float32 to float16") == 1  # once in the progress, not per forward


def test_progress_inside_a_candidate_names_each_step(rtn_only):
    # a candidate was silent for up to 15 minutes on a slow CPU (issue 18 item 9)
    lines: list[str] = []
    compare(tiny_llama(), ["rtn:int8"], log=lines.append, **SMALL)
    candidate = lines[lines.index(next(x for x in lines if x.startswith("[1/1] rtn:int8"))) :]
    assert any(x.startswith("    quantized 14 layer(s) in ") for x in candidate), candidate
    assert (
        "    perplexity: window 1/3 of 32 tokens" in candidate
        and "    perplexity: window 3/3 of 32 tokens" in candidate
    )
    assert any(
        x.startswith("    latency: 1 round(s) of prefill and decode, each next to the unquantized")
        for x in candidate
    )


def test_a_misnamed_candidate_fails_before_the_model_is_loaded(rtn_only, monkeypatch, model_dir):
    # `compare -c absmax:int3` spent 14 s loading before saying so (issue 18 item 6)
    import quantplug.comparison

    def never(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a candidate that does not exist")

    monkeypatch.setattr(quantplug.comparison, "_prepare_model", never)
    with pytest.raises(quantplug.UnknownMethodError, match="absmax"):
        compare(model_dir, ["absmax:int3"], **SMALL)
    with pytest.raises(quantplug.ConfigError, match="int3"):
        compare(model_dir, ["rtn:int3"], **SMALL)
