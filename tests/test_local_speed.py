"""``quantplug bench-presets`` (issue 17 item 4): speed figures measured on this machine, stored per
machine in the user's cache folder, and ``select`` ranking by them (or, on request, by the
declared ones). Nothing here asserts that anything is faster: only that figures are measured,
stored, read back and used."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from click.testing import CliRunner
from torch import nn  # imported before the module starts: conftest then runs torch on one thread

import quantplug
from quantplug import speed_store
from quantplug.bench_shapes import DEFAULT_SHAPES, TARGET_PARAMS, model_shapes, parse_shapes, synthetic_plan
from quantplug.candidates import presets_of
from quantplug.cli import main
from quantplug.errors import ConfigError
from quantplug.hardware import detect_hardware
from quantplug.selection import select

TINY = [(64, 64), (128, 64)]


@pytest.fixture
def cache(tmp_path, monkeypatch, rtn_only):
    """rtn only, and an empty cache folder for the figures."""
    monkeypatch.setenv("QUANTPLUG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _rtn_labels() -> list[str]:
    return [f"rtn:{p.name}" for p in presets_of(quantplug.get_backend("rtn"))]


def _store(entries: dict[str, dict]) -> None:
    """Write a figures file for this machine's CPU by hand."""
    path = speed_store.store_path(detect_hardware("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "machine": {}, "presets": entries}))


def _entry(decode: float, prefill: float = 1.0, **extra) -> dict:
    version = quantplug.get_backend("rtn").plugin_version
    return {"decode": decode, "prefill": prefill, "vs": "float32", "date": "2026-01-02T03:04:05+00:00",
            "plugin_version": version, **extra}  # fmt: skip


def test_bench_presets_measures_stores_and_select_uses_the_figures(cache):
    result = quantplug.bench_presets(TINY, device="cpu", presets=["rtn"], budget_s=0.1)
    path = speed_store.store_path(detect_hardware("cpu"))
    assert result.path == path and path.parent == cache and path.name.startswith("speed-cpu-")
    data = json.loads(path.read_text())
    assert data["format"] == 1
    assert {"key", "device", "name", "description", "cpu_count", "torch", "threads", "date"} <= set(
        data["machine"]
    )
    assert data["last_run"]["shapes"] == ["128x64", "64x64"] and data["last_run"]["vs"] == "float32"
    assert set(data["presets"]) == set(_rtn_labels()) and data["skipped"] == {}
    for label, e in data["presets"].items():
        assert e["decode"] > 0 and e["prefill"] > 0 and e["vs"] == "float32", label
        assert e["vs_float32"] == {"decode": e["decode"], "prefill": e["prefill"]}
        assert e["vs_bfloat16"]["decode"] > 0 and e["vs_bfloat16"]["prefill"] > 0
        for model in ("candidate", "float32", "bfloat16"):
            assert e["ms"][model]["decode"] > 0 and e["ms"][model]["prefill"] > 0
        assert (
            e["plugin"] == "quantplug-rtn"
            and e["plugin_version"] == quantplug.get_backend("rtn").plugin_version
        )
        assert (
            e["dtype"] in ("float32", "bfloat16") and e["rounds"] >= 3 and e["shapes"] == ["128x64", "64x64"]
        )
        assert e["date"] == data["machine"]["date"]
    sel = select(1e9, device="cpu")
    assert sel.local_speed_file == str(path) and sel.to_dict()["local_speed_file"] == str(path)
    assert sel.candidates
    for c in sel.candidates:
        assert c.speed_source == "measured here" and c.speed == data["presets"][c.label]["decode"]
        assert c.to_dict()["speed_source"] == "measured here"
        assert f"measured here (quantplug bench-presets, {data['machine']['date'][:10]})" in c.reasons[1]
    assert any("measured on this machine" in n for n in sel.notes)
    prefill = {c.label: c.speed for c in select(1e9, device="cpu", workload="prefill").candidates}
    assert all(v == data["presets"][label]["prefill"] for label, v in prefill.items())
    mixed = select(1e9, device="cpu", workload="mixed").candidates[0]
    e = data["presets"][mixed.label]
    assert mixed.speed == pytest.approx(math.sqrt(e["decode"] * e["prefill"]))


def test_a_stored_figure_decides_the_rank(cache):
    declared = select(1e9, device="cpu", priority="speed").candidates
    last = declared[-1]
    assert last.rank > 1 and last.speed_source in ("declared", None)
    _store({last.label: _entry(50.0)})
    ranked = select(1e9, device="cpu", priority="speed").candidates
    assert (
        ranked[0].label == last.label
        and ranked[0].speed == 50.0
        and ranked[0].speed_source == "measured here"
    )
    assert "2026-01-02" in ranked[0].reasons[1]
    assert all(c.speed_source != "measured here" for c in ranked[1:])
    # turned off: the declared figures, as before
    off = select(1e9, device="cpu", priority="speed", local_speed=False)
    assert [c.label for c in off.candidates] == [c.label for c in declared]
    assert all(c.speed_source != "measured here" for c in off.candidates) and off.local_speed_file is None
    assert any("declared by quantplug-rtn" in r for r in off.candidates[0].reasons)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "cannot be read"),
        ('{"format": 99, "presets": {}}', "its format is 99"),
        ('["a list"]', "not a quantplug bench-presets file"),
        ('{"format": 1, "presets": {"rtn:int8": {"decode": -1, "prefill": "x"}}}', "no positive decode"),
    ],
)
def test_an_unusable_file_warns_and_the_declared_figures_are_used(cache, text, message):
    path = speed_store.store_path(detect_hardware("cpu"))
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.warns(UserWarning, match=message):
        sel = select(1e9, device="cpu")
    assert sel.local_speed_file is None
    assert all(c.speed_source != "measured here" for c in sel.candidates)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even read when turned off
        select(1e9, device="cpu", local_speed=False)


def test_a_figure_measured_with_another_plugin_version_is_ignored(cache):
    label = _rtn_labels()[0]
    _store({label: _entry(50.0, plugin_version="0.0.0-old")})
    sel = select(1e9, device="cpu", priority="speed")
    assert all(c.speed_source != "measured here" for c in sel.candidates)
    assert any(label in n and "0.0.0-old" in n for n in sel.notes)


def test_another_machine_or_device_does_not_use_the_figures(cache):
    _store({label: _entry(50.0) for label in _rtn_labels()})
    other = quantplug.selection.Hardware("cpu", "Some Other CPU", None, None, False)
    assert all(c.speed_source != "measured here" for c in select(1e9, device=other).candidates)
    gpu = quantplug.selection.Hardware("cuda", "test GPU", (9, 0), None, False)
    assert all(c.speed_source != "measured here" for c in select(1e9, device=gpu).candidates)


def test_a_note_naming_the_machine_is_quoted(cache, make_backend):
    backend = make_backend(
        "tp-speed",
        capabilities=quantplug.Capabilities(bits=(4,), devices=("cpu",)),
        presets=(
            quantplug.Preset("q4", {"bits": 4}, bits=4, speed={"cpu": {"decode": 2.0}},
                             note="cpu speed measured on a 2-core EPYC; vs float32"),
        ),
    )  # fmt: skip
    quantplug.register_backend(backend)
    c = next(c for c in select(1e9, device="cpu").candidates if c.label == "tp-speed:q4")
    assert c.reasons[1].endswith("2x the unquantized model (declared by inline:tp-speed on a 2-core EPYC)")


def test_presets_that_cannot_run_here_are_skipped_with_the_reason(cache, make_backend):
    backend = make_backend(
        "tp-cal",
        capabilities=quantplug.Capabilities(bits=(4,), devices=("cpu",), needs_calibration=True),
        presets=(quantplug.Preset("q4", {"bits": 4}, bits=4),),
    )
    quantplug.register_backend(backend)
    label = _rtn_labels()[0]
    result = quantplug.bench_presets([(64, 64)], presets=["tp-cal", label], budget_s=0)
    assert result.skipped == {"tp-cal:q4": "needs calibration data"}
    assert list(result.entries) == [label]
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        quantplug.bench_presets([(64, 64)], presets=["rtn:nope"])


def test_shapes_and_the_synthetic_model():
    assert parse_shapes(None) == dict.fromkeys(DEFAULT_SHAPES, 1)
    assert parse_shapes(["1536x576", (576, 1536), "1536X576"]) == {(1536, 576): 2, (576, 1536): 1}
    with pytest.raises(ConfigError, match="OUTxIN"):
        parse_shapes(["576"])
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 128))
    assert model_shapes(model) == {(128, 64): 2, (64, 128): 1}
    plan = synthetic_plan({(128, 64): 2, (64, 128): 1}, "cpu")
    assert plan.shapes == [(128, 64), (64, 128)] and plan.copies == 16
    # a large model's layers: rarest shapes dropped, then the largest halved, to stay near the target
    big = {(28672, 8192): 3, (8192, 28672): 1, (8192, 8192): 2, (1024, 8192): 2, (512, 512): 1}
    plan = synthetic_plan(big, "cpu")
    assert plan.params <= 2 * TARGET_PARAMS["cpu"] and len(plan.shapes) == 1
    assert any("left out" in n for n in plan.notes) and any("halved" in n for n in plan.notes)


def test_cli_bench_presets_then_select(cache):
    label = _rtn_labels()[0]
    runner = CliRunner()
    res = runner.invoke(main, ["bench-presets", "--shape", "64x64", "-c", label, "--budget", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert list(out["presets"]) == [label] and out["presets"][label]["decode"] > 0
    assert f"[1/1] {label}" in res.stderr and "figures written to" in res.stderr
    res = runner.invoke(main, ["bench-presets", "--shape", "64x64", "-c", label, "--budget", "0"])
    assert res.exit_code == 0 and label in res.stdout and "decode" in res.stdout
    sel = runner.invoke(main, ["select", "--params", "1e9", "--device", "cpu", "--json"])
    sources = {
        c["backend"] + ":" + c["preset"]: c["speed_source"] for c in json.loads(sel.stdout)["candidates"]
    }
    assert sources.get(label, "measured here") == "measured here"
    assert "measured here" in sources.values()
    sel = runner.invoke(main, ["select", "--params", "1e9", "--device", "cpu", "--json", "--declared-speed"])
    assert "measured here" not in {c["speed_source"] for c in json.loads(sel.stdout)["candidates"]}
