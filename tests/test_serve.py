"""``select(serve=...)`` / ``quantplug select --serve``: only presets whose plugin declares that a
serving engine reads their checkpoints as they are (``Preset.servable_by``), and the
case-insensitive preset names of ``resolve`` / ``quantize --preset`` (issue 16).

The backends are rtn (QUANTPLUG_PLUGINS=rtn hides the others; it declares no engine) and a
third-party descriptor registered in the test, so every verdict follows from the declarations here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import quantplug
from quantplug.selection import resolve, select


@pytest.fixture
def servable(make_backend, rtn_only):
    """rtn plus `tp-serve`: `w4a16` served by vllm and sglang, `w8a8` by sglang only, `raw` by none."""
    backend = make_backend(
        "tp-serve",
        capabilities=quantplug.Capabilities(bits=(4, 8), devices=("cpu", "cuda")),
        presets=(
            quantplug.Preset("w4a16", {"bits": 4}, bits=4, bits_per_weight=4.25, servable_by=("vllm", "sglang")),
            quantplug.Preset("w8a8", {"bits": 8}, bits=8, bits_per_weight=8.0, servable_by="sglang"),
            quantplug.Preset("raw", {"bits": 4}, bits=4, bits_per_weight=4.5),
        ),
    )  # fmt: skip
    quantplug.register_backend(backend)
    return backend


def test_only_the_presets_the_engine_serves_are_ranked_and_say_so(servable):
    sel = select(7e9, device="cpu", serve="vllm")
    assert [c.label for c in sel.candidates] == ["tp-serve:w4a16"]
    (best,) = sel.candidates
    assert best.servable_by == ("vllm", "sglang")
    plugin = quantplug.get_backend("tp-serve").plugin  # "inline:tp-serve": registered by the test
    assert f"vllm serves its checkpoints as they are (declared by {plugin})" in best.reasons
    assert sel.serve == "vllm"


def test_the_others_are_rejected_naming_the_engine_and_what_it_serves(servable):
    sel = select(7e9, device="cpu", serve="vllm")
    plugin = quantplug.get_backend("tp-serve").plugin
    reasons = {(r.backend, r.preset): r.reason for r in sel.rejected}
    assert reasons[("tp-serve", "raw")] == (
        f"vllm does not serve its checkpoints as they are (not declared by {plugin}); "
        "installed presets vllm serves: tp-serve:w4a16"
    )
    assert reasons[("tp-serve", "w8a8")].startswith(
        "vllm does not serve its checkpoints as they are (its plugin declares sglang only)"
    )
    rtn = [r for r in sel.rejected if r.backend == "rtn"]
    assert rtn and all(r.reason.startswith("vllm does not serve") and not r.fix for r in rtn)
    # the same rule for another engine: sglang serves both declared presets
    assert sorted(c.label for c in select(7e9, device="cpu", serve="sglang").candidates) == [
        "tp-serve:w4a16",
        "tp-serve:w8a8",
    ]


def test_an_engine_no_installed_preset_serves_says_so_with_the_fix(rtn_only):
    sel = select(7e9, device="cpu", serve="TGI")  # names are matched in lowercase
    assert sel.candidates == [] and sel.serve == "tgi"
    assert sel.rejected and all(
        r.reason.endswith("no installed preset declares a checkpoint tgi serves")
        and "servable_by=('tgi',)" in r.fix
        for r in sel.rejected
    )
    assert "rtn: tgi does not serve its checkpoints as they are" in sel.table()


def test_serve_none_changes_nothing(servable):
    plain, again = select(7e9, device="cpu"), select(7e9, device="cpu", serve=None)
    assert [c.label for c in plain.candidates] == [c.label for c in again.candidates]
    assert {"tp-serve:w4a16", "tp-serve:w8a8", "tp-serve:raw"} <= {c.label for c in plain.candidates}
    assert not any("serves" in r for c in plain.candidates for r in c.reasons)
    assert plain.serve is None and plain.to_dict()["serve"] is None


def test_the_json_carries_servable_by_per_candidate(servable):
    out = select(7e9, device="cpu").to_dict()
    by = {f"{c['backend']}:{c['preset']}": c["servable_by"] for c in out["candidates"]}
    assert by["tp-serve:w4a16"] == ["vllm", "sglang"] and by["tp-serve:raw"] == [] and by["rtn:int8"] == []
    assert select(7e9, device="cpu", serve="vllm").to_dict()["serve"] == "vllm"


def test_an_unknown_engine_is_a_config_error_listing_the_names(servable, make_backend):
    with pytest.raises(quantplug.ConfigError, match=r"'vlm'.*vllm, sglang, tgi") as err:
        select(7e9, device="cpu", serve="vlm")
    assert err.value.field == "serve" and err.value.allowed == ["sglang", "tgi", "vllm"]
    # an engine an installed preset declares is accepted, though quantplug does not know it
    quantplug.register_backend(
        make_backend(
            "tp-lmdeploy", presets=(quantplug.Preset("q4", {"bits": 4}, bits=4, servable_by="lmdeploy"),)
        )
    )
    assert [c.label for c in select(7e9, device="cpu", serve="lmdeploy").candidates] == ["tp-lmdeploy:q4"]


def test_a_pre_quantized_checkpoint_is_servable_as_the_preset_it_equals(tmp_path, servable):
    def folder(bits: int):
        config = {
            "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128, "intermediate_size": 80,
            "num_attention_heads": 4, "quantization_config": {"quant_method": "tp-serve", "bits": bits},
        }  # fmt: skip
        path = tmp_path / f"b{bits}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        return path

    four = select(folder(4), device="cpu", serve="vllm")  # the config of w4a16 (vllm, sglang)
    assert [c.label for c in four.candidates] == ["tp-serve:checkpoint"]
    assert four.candidates[0].servable_by == ("vllm", "sglang")
    eight = select(folder(8), device="cpu", serve="vllm")  # the config of w8a8 (sglang only)
    assert eight.candidates == []
    assert "sglang only" in next(r.reason for r in eight.rejected if r.backend == "tp-serve")


@pytest.mark.parametrize("bad", ["vLLM", "", "v llm", 3])
def test_a_bad_servable_by_is_a_descriptor_problem(bad, make_backend):
    backend = make_backend(
        "tp-bad", presets=(quantplug.Preset("q4", {"bits": 4}, bits=4, servable_by=("vllm", bad)),)
    )
    problems = backend.problems()
    assert any(
        "servable_by entries must be lowercase engine names" in p and repr(bad) in p for p in problems
    ), problems
    good = make_backend("tp-good", presets=(quantplug.Preset("q4", {"bits": 4}, bits=4, servable_by="vllm"),))
    assert good.problems() == [] and good.presets[0].servable_by == ("vllm",)
    assert good.presets[0].to_dict()["servable_by"] == ["vllm"]


def test_resolve_matches_preset_names_case_insensitively(rtn_only):
    assert resolve("rtn:INT4-G128").label == "rtn:int4-g128"
    assert resolve("rtn: Int8 ").label == "rtn:int8"
    with pytest.raises(quantplug.ConfigError, match="its presets: int8, int4-g32, int4-g32-asym") as err:
        resolve("rtn:INT3")
    assert "rtn:int4-g128" in err.value.allowed


def _run_cli(*args: str, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantplug.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


#: A plugin module, importable from a temporary folder, registering `tp-serve` as the fixture does
_PLUGIN = textwrap.dedent(
    """
    import dataclasses
    import quantplug

    @dataclasses.dataclass(frozen=True)
    class ServeConfig(quantplug.QuantConfig):
        quant_method = "tp-serve"
        bits: int = 4

    @quantplug.hookimpl
    def register_backends(register):
        register(quantplug.Backend(
            name="tp-serve", config=ServeConfig, quantizer="quantplug:Quantizer",
            capabilities=quantplug.Capabilities(bits=(4, 8)),
            presets=(
                quantplug.Preset("w4a16", {"bits": 4}, bits=4, bits_per_weight=4.25, servable_by=("vllm",)),
                quantplug.Preset("raw", {"bits": 4}, bits=4, bits_per_weight=4.5),
            ),
        ))
    """
)


def test_cli_select_serve_vllm(tmp_path, subprocess_env):
    # an installed plugin: its module and a dist-info with its entry point, on PYTHONPATH
    (tmp_path / "tp_serve_plugin.py").write_text(_PLUGIN)
    info = tmp_path / "tp_serve_plugin-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-serve-plugin\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[quantplug]\ntp-serve = tp_serve_plugin\n")
    env = subprocess_env(tmp_path, QUANTPLUG_PLUGINS="rtn,tp-serve")
    proc = _run_cli("select", "--params", "7e9", "--device", "cpu", "--serve", "vllm", env=env)
    assert proc.returncode == 0, proc.stderr
    assert " 1. tp-serve:w4a16" in proc.stdout and "served by vllm" in proc.stdout
    assert "- vllm serves its checkpoints as they are (declared by" in proc.stdout
    assert "tp-serve:raw: vllm does not serve its checkpoints as they are" in proc.stdout
    assert (
        "rtn: vllm does not serve" in proc.stdout
        and "installed presets vllm serves: tp-serve:w4a16" in proc.stdout
    )
    as_json = json.loads(
        _run_cli("select", "--params", "7e9", "--device", "cpu", "--serve", "vllm", "--json", env=env).stdout
    )
    assert as_json["serve"] == "vllm"
    assert [(c["preset"], c["servable_by"]) for c in as_json["candidates"]] == [("w4a16", ["vllm"])]


def test_cli_select_serve_refuses_an_unknown_engine_and_explains_the_flag(subprocess_env):
    env = subprocess_env(QUANTPLUG_PLUGINS="rtn")
    proc = _run_cli("select", "--params", "7e9", "--device", "cpu", "--serve", "triton", env=env)
    assert proc.returncode == 1 and "serve 'triton' is not a serving engine" in proc.stderr
    assert "vllm, sglang, tgi" in proc.stderr
    help_text = _run_cli("select", "--help", env=env).stdout
    assert "--serve ENGINE" in help_text and "without conversion" in " ".join(help_text.split())


def test_cli_quantize_takes_a_preset_name_in_any_case(tmp_path, rtn_only):
    from click.testing import CliRunner

    from quantplug.cli import main
    from quantplug.testing import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "model")
    runner = CliRunner()
    args = ["quantize", str(tmp_path / "model"), "-m", "rtn", "--no-progress", "-o", str(tmp_path / "out")]
    result = runner.invoke(main, [*args, "--preset", "INT4-G128"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4 and config["group_size"] == 128
    wrong = runner.invoke(main, [*args, "--preset", "INT3"])
    assert (
        wrong.exit_code == 1
        and "has no preset 'INT3'; its presets: int8, int4-g32, int4-g32-asym" in wrong.output
    )
