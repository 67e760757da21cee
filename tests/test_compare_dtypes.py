"""``compare`` measures what the user will run: the unquantized model in float32 and in bfloat16
side by side (where the device computes in bfloat16), each candidate in the dtype its preset is
built for, ``dtype=`` forcing one; torch's threads chosen from the free cores; other processes'
CPU use measured, and unreliable latency flagged."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import quantplug
from quantplug import machine_load
from quantplug.compare_settings import bf16_native
from quantplug.comparison import compare
from quantplug.recommendation import candidates
from quantplug.runs import to_dtype
from quantplug.testing import tiny_llama

SMALL = {"tokens": 96, "window": 32, "decode_tokens": 2, "repeats": 1}
BF16 = bf16_native(torch.device("cpu"))


def test_default_runs_both_baselines_and_each_candidate_in_its_presets_dtype(rtn_only):
    lines: list[str] = []
    result = compare(tiny_llama(), ["rtn:int8", "rtn:int4-g32-asym"], log=lines.append, **SMALL)
    labels = [r.label for r in result.rows]
    bf16 = ["unquantized (bfloat16)"] if BF16 else []
    assert labels == ["unquantized", *bf16, "rtn:int8", "rtn:int4-g32-asym"]
    dtypes = {r.label: r.dtype for r in result.rows}
    assert dtypes["unquantized"] == "float32"
    assert dtypes["rtn:int8"] == "bfloat16"  # Preset.dtype of rtn's fused-kernel preset
    assert dtypes["rtn:int4-g32-asym"] == "float32"  # no dtype declared: the model's own
    assert [r.label for r in candidates(result.rows)] == ["rtn:int8", "rtn:int4-g32-asym"]
    if BF16:
        row = result.rows[1]
        assert row.backend is None and row.perplexity and row.decode_ms and row.weight_bytes
        assert row.weight_bytes * 2 == result.rows[0].weight_bytes  # bf16 weights: half of fp32
        assert row.acceptable is None  # a baseline, never judged or recommended
        assert "Against unquantized (bfloat16)" in result.recommendation or result.recommended is None
    assert any("rtn:int8: quantizing in bfloat16" in line for line in lines)
    table = result.table()
    assert "| dtype |" in table and "| rtn:int8 | bfloat16 |" in table
    assert "bfloat16" in result.settings["dtype"]


def test_a_given_dtype_runs_everything_in_it(rtn_only):
    result = compare(tiny_llama(), ["rtn:int8"], dtype="float32", **SMALL)
    assert [(r.label, r.dtype) for r in result.rows] == [("unquantized", "float32"), ("rtn:int8", "float32")]
    assert "dtype given" in result.settings["dtype"]
    forced = compare(tiny_llama(), ["rtn:int4-g32-asym"], dtype=torch.bfloat16, **SMALL)
    assert [r.dtype for r in forced.rows] == ["bfloat16", "bfloat16"]


@pytest.mark.parametrize("dtype", ["bf16", "int8", 3])
def test_a_dtype_that_is_not_a_float_dtype_is_refused(dtype, rtn_only):
    with pytest.raises(quantplug.ConfigError, match="dtype"):
        compare(tiny_llama(), ["rtn:int8"], dtype=dtype, **SMALL)


def test_converting_a_candidate_keeps_computed_buffers_as_loading_would():
    model = to_dtype(tiny_llama(), torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # non-persistent: computed, kept
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_threads_given_are_used_and_stated_and_the_callers_count_comes_back(rtn_only):
    before = torch.get_num_threads()
    result = compare(tiny_llama(), ["rtn:int8"], threads=1, **SMALL, dtype="float32")
    assert result.environment["torch_threads"] == 1 and result.settings["threads"] == "1 (given)"
    assert torch.get_num_threads() == before
    with pytest.raises(quantplug.ConfigError, match="threads"):
        compare(tiny_llama(), ["rtn:int8"], threads=0, **SMALL)


def test_the_report_states_threads_and_the_load_during_the_run(rtn_only):
    from quantplug.comparison import to_markdown

    result = compare(tiny_llama(), ["rtn:int8"], dtype="float32", **SMALL)
    load = result.environment["load"]
    assert set(load) >= {"other_processes_cores_during", "loadavg_before", "loadavg_after", "unreliable"}
    md = to_markdown(result)
    assert "- Threads: " in md and "core(s) busy during the run" in md
    result.environment["load"] = dict(load, other_processes_cores_during=1.4, unreliable=True)
    assert "**Latency figures unreliable**: other processes kept 1.4 core(s) busy" in result.table()


def test_a_busy_process_is_seen_and_leaves_fewer_threads():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<6: pass"])
    try:
        time.sleep(0.5)
        seen = machine_load.others_busy(1.5)
    finally:
        busy.kill()
        busy.wait()
    assert seen is not None and seen >= 0.6, seen  # one core kept busy by another process
    assert machine_load.free_cores(seen, cores=2) == 1
    assert machine_load.free_cores(0.0, cores=2) == 2 and machine_load.free_cores(5.0, cores=2) == 1


def test_a_monitor_flags_other_work_during_the_run():
    monitor = machine_load.LoadMonitor()
    monitor.start(0.0)
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"]
    )
    busy.wait()
    monitor.stop()
    assert monitor.during is not None and monitor.during >= machine_load.UNRELIABLE_BUSY_CORES
    assert monitor.unreliable and monitor.to_dict()["unreliable"] is True
