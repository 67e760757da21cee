"""The command line: ``--version``, ``list`` (table and JSON) and ``doctor``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

import quantplug
from quantplug.cli import main

RTN_VERSION = version("quantplug-rtn")


@pytest.fixture
def cli():
    """``cli(*args)``: invoke the CLI in-process against the process-wide registry."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_version_in_process(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"quantplug, version {quantplug.__version__}"
    assert quantplug.__version__ == version("quantplug")


def test_version_as_a_command(subprocess_env):
    proc = subprocess.run(
        [sys.executable, "-m", "quantplug.cli", "--version"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"quantplug, version {version('quantplug')}"


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    assert "list" in result.output and "doctor" in result.output


def test_list_table(cli, rtn_only):
    result = cli("list")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["backend", "plugin", "library", "status", "capabilities"]
    (row,) = [line for line in lines[1:] if line.startswith("rtn ")]
    assert f"quantplug-rtn {RTN_VERSION}" in row
    assert " available " in row
    assert "bits=2,4,8" in row and "devices=cpu,cuda,mps" in row and "serializable" in row
    assert "calibration" not in row and "trainable" not in row
    assert result.stderr == ""


def test_list_table_shows_unavailable_backends_with_reason(cli, make_backend):
    quantplug.register_backend(make_backend("needs-missing", requires=("quantplug-test-no-such-lib>=1",)))
    result = cli("list")
    assert result.exit_code == 0
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("needs-missing ")]
    assert "quantplug-test-no-such-lib (missing)" in row
    assert "unavailable: quantplug-test-no-such-lib is not installed" in row


def test_list_shows_notes(cli, make_backend):
    quantplug.register_backend(make_backend("noted", notes="upstream is in maintenance mode"))
    assert "note: noted: upstream is in maintenance mode" in cli("list").stdout


def test_list_with_no_backends_says_what_to_install(cli, monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    quantplug.reload_plugins()
    result = cli("list")
    assert result.exit_code == 0
    assert "No backends installed" in result.stdout
    # the plugins are not on the package index yet: the hint is this checkout's folder (issue 18)
    rtn = Path(__file__).resolve().parents[1] / "plugins" / "rtn"
    assert f"the reference backend: pip install {rtn}" in result.stdout


def test_list_with_every_plugin_allow_listed_out_says_so_not_install(cli, monkeypatch):
    monkeypatch.setenv("QUANTPLUG_PLUGINS", "")
    quantplug.reload_plugins()
    result = cli("list")
    assert result.exit_code == 0
    assert "No backends installed" not in result.stdout and "pip install" not in result.stdout
    assert (
        "No backends enabled: " in result.stdout and " plugin(s) are installed but disabled." in result.stdout
    )
    assert re.search(r"Disabled by QUANTPLUG_PLUGINS \(set to ''\): [^.]*\brtn\b", result.stdout)
    assert "To use them, add their names to QUANTPLUG_PLUGINS (or unset it" in result.stdout


def test_list_with_every_plugin_deny_listed_says_which_variable(cli, monkeypatch):
    monkeypatch.setenv("QUANTPLUG_PLUGINS", "rtn")
    monkeypatch.setenv("QUANTPLUG_DISABLE_PLUGINS", "quantplug-rtn")
    quantplug.reload_plugins()
    out = cli("list").stdout
    assert re.search(r"No backends enabled: \d+ plugin\(s\) are installed but disabled.", out)
    assert "Disabled by QUANTPLUG_DISABLE_PLUGINS (set to 'quantplug-rtn'): rtn." in out
    assert "To use them, remove their names from QUANTPLUG_DISABLE_PLUGINS (or unset it)." in out


def test_list_json(cli, rtn_only):
    result = cli("list", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["quantplug"] == quantplug.__version__
    assert data["plugin_problems"] == []
    (rtn,) = [b for b in data["backends"] if b["name"] == "rtn"]
    assert rtn["plugin"] == "quantplug-rtn"
    assert rtn["plugin_version"] == RTN_VERSION
    assert rtn["available"] is True
    assert rtn["reason"] is None and rtn["fix"] is None
    assert rtn["requires"] == [] and rtn["libraries"] == {}
    caps = rtn["capabilities"]
    assert caps["bits"] == [2, 4, 8]
    assert caps["devices"] == ["cpu", "cuda", "mps"]
    assert caps["needs_calibration"] is False and caps["serializable"] is True
    assert caps["max_rel_error"] == {"2": 0.75, "4": 0.16, "8": 0.02}


def test_list_json_reports_unavailable_backends_and_plugin_problems(cli, make_backend, make_plugin):
    quantplug.register_backend(make_backend("needs-old-pluggy", requires=("pluggy<0.1",)))

    def raises(register):
        raise RuntimeError("boom")

    quantplug.register_plugin(make_plugin(raises), name="jsonbroken")
    result = cli("list", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    (b,) = [b for b in data["backends"] if b["name"] == "needs-old-pluggy"]
    assert b["available"] is False
    assert b["libraries"] == {"pluggy": version("pluggy")}
    assert "is incompatible with this quantplug: it needs pluggy<0.1" in b["fix"]
    (p,) = [p for p in data["plugin_problems"] if p["plugin"] == "jsonbroken"]
    assert "register_backends raised RuntimeError: boom" in p["problem"] and p["fix"]


def test_list_table_warns_about_plugin_problems_on_stderr(cli, make_plugin):
    def raises(register):
        raise RuntimeError("boom")

    quantplug.register_plugin(make_plugin(raises), name="tablebroken")
    result = cli("list")
    assert result.exit_code == 0
    assert "1 plugin problem(s); run `quantplug doctor`" in result.stderr
    assert "rtn" in result.stdout


def test_doctor_clean(cli, rtn_only):
    result = cli("doctor")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"quantplug {quantplug.__version__}, Python ")
    assert f"plugin rtn [quantplug-rtn {RTN_VERSION}]: loaded -> backends: rtn" in result.stdout
    assert result.stdout.rstrip().endswith("No problems found.")


def test_doctor_reports_a_programmatically_registered_broken_plugin(cli, rtn_only, make_plugin):
    def raises(register):
        raise RuntimeError("simulated bug")

    quantplug.register_plugin(make_plugin(raises), name="doctorbroken")
    result = cli("doctor")
    assert result.exit_code == 1
    out = result.stdout
    assert "No problems found." not in out
    assert (
        "plugin doctorbroken" in out
        and "failed (register_backends raised RuntimeError: simulated bug)" in out
    )
    assert "1 problem(s):" in out
    assert "- doctorbroken: register_backends raised RuntimeError: simulated bug" in out
    assert "    fix: report this to the maintainers of doctorbroken" in out


def test_doctor_reports_unavailable_backends(cli, rtn_only, make_backend):
    quantplug.register_backend(make_backend("needs-missing", requires=("quantplug-test-no-such-lib",)))
    result = cli("doctor")
    assert result.exit_code == 1
    assert (
        "- inline:needs-missing (backend 'needs-missing'): quantplug-test-no-such-lib is not installed\n"
        "    fix: pip install quantplug-test-no-such-lib"
    ) in result.stdout


def test_doctor_clean_again_after_unregistering(cli, rtn_only, make_backend, plugin_registering):
    quantplug.register_plugin(plugin_registering([make_backend("Bad")]), name="temp-bad")
    assert cli("doctor").exit_code == 1
    quantplug.unregister_plugin("temp-bad")
    assert cli("doctor").exit_code == 0


def test_doctor_shows_disabled_plugins(cli, monkeypatch):
    monkeypatch.setenv("QUANTPLUG_PLUGINS", "rtn")  # nothing else installed may add problems
    monkeypatch.setenv("QUANTPLUG_DISABLE_PLUGINS", "rtn")
    quantplug.reload_plugins()
    result = cli("doctor")
    assert result.exit_code == 0
    assert "plugin rtn [quantplug-rtn" in result.stdout
    assert "disabled (disabled by QUANTPLUG_DISABLE_PLUGINS)" in result.stdout


def test_unknown_command_fails():
    runner = CliRunner()
    result = runner.invoke(main, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output


def test_compare_refuses_a_plot_it_cannot_draw_before_measuring(cli, monkeypatch, tmp_path, rtn_only):
    # issue 18 item 9: without matplotlib, compare measured for minutes and then failed on --plot
    import importlib.util

    import quantplug.comparison

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )

    def never(*args, **kwargs):
        raise AssertionError("compare must not start")

    monkeypatch.setattr(quantplug.comparison, "compare", never)
    result = cli("compare", str(tmp_path), "--plot", str(tmp_path / "p.png"))
    assert result.exit_code == 2
    assert "--plot needs matplotlib, which is not installed" in result.output
    assert "nothing was measured" in result.output


def test_compare_writes_what_it_measured_before_the_plot_can_fail(cli, monkeypatch, tmp_path, rtn_only):
    from quantplug.report import Comparison
    from quantplug.testing import tiny_llama

    folder = quantplug.save(tiny_llama(), tmp_path / "fp")

    def broken_plot(self, path):
        raise quantplug.ConfigError("simulated plot failure", field="plot")

    monkeypatch.setattr(Comparison, "plot", broken_plot)
    args = ["--tokens", "64", "--decode-tokens", "1", "--repeats", "1", "--prefill-tokens", "8"]
    result = cli(
        "compare",
        str(folder),
        "-c",
        "rtn:int8",
        *args,
        "--out-dir",
        str(tmp_path / "out"),
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert result.exit_code == 1 and "simulated plot failure" in result.output
    assert (tmp_path / "out" / "comparison.json").exists() and (tmp_path / "out" / "comparison.md").exists()
    assert "| rtn:int8 |" in result.output  # the table was printed before the plot was tried


def test_quantize_of_an_already_quantized_folder_speaks_cli_not_python(
    cli, rtn_only, rtn_checkpoint, tmp_path
):
    # it said "load it without config=" (issue 18 item 6)
    result = cli("quantize", str(rtn_checkpoint[0]), "-m", "rtn", "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert (
        "is already quantized (quant_method 'rtn'): `quantplug quantize` needs a full-precision checkpoint"
        in result.output
    )
    assert "config=" not in result.output
    assert not (tmp_path / "out").exists()
