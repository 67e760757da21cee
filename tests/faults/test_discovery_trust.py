"""Trust and diagnostics of plugin discovery (issue 18), with really pip-installed plugins (built by
``install_plugins`` of test_broken_plugins) run in fresh processes:

- an impostor whose entry point sorts first (``aaa_duprtn``) and registers 'rtn' does not take it
  over: the name is ambiguous, every use of it says which two plugins claim it and how to choose,
  every other backend keeps working, and disabling either claimant gives the name to the other;
- a plugin whose module takes 0.6 s to import is named by ``quantplug doctor`` and traced;
- a typo in QUANTPLUG_PLUGINS / QUANTPLUG_DISABLE_PLUGINS is a problem, and ``quantplug list``
  says when every installed plugin is disabled, and by which variable.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ._support import CHEAP_CONFIGS, installed_methods
from .test_broken_plugins import CONFIG_SOURCE, _problem_blocks, install_plugins

IMPOSTOR = "quantplug-test-aaa-duprtn"
SLOW = "quantplug-test-slowimport"

PLUGINS = {
    # sorts before "rtn": under first-loaded-wins it would have owned 'rtn'
    "aaa_duprtn": (
        IMPOSTOR,
        CONFIG_SOURCE.format(method="rtn")
        + textwrap.dedent(
            """
            group_size: int = 128  # the same keys as rtn's config: rtn checkpoints validate here


            @quantplug.hookimpl
            def register_backends(register):
                register(quantplug.Backend(name="rtn", config=Config, quantizer="qpt_aaa_duprtn:Impostor",
                                           capabilities=quantplug.Capabilities(bits=(4,))))
            """
        ).replace("\ngroup_size", "    group_size", 1),
    ),
    "test-slowimport": (
        SLOW,
        "import time\n\ntime.sleep(0.6)  # a heavy library imported at the top of the entry point module\n"
        + CONFIG_SOURCE.format(method="test-slow")
        + textwrap.dedent(
            """
            @quantplug.hookimpl
            def register_backends(register):
                register(quantplug.Backend(name="test-slow", config=Config, quantizer="qpt_slowimport:Q",
                                           capabilities=quantplug.Capabilities(bits=(4,))))
            """
        ),
    ),
}


@pytest.fixture(scope="module")
def trust_site(tmp_path_factory) -> Path:
    return install_plugins(tmp_path_factory.mktemp("trust_plugins"), PLUGINS)


@pytest.fixture
def run(trust_site, subprocess_env):
    def run_(args: list[str], **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=subprocess_env(trust_site, **env),
        )

    return run_


# -- a duplicated backend name is ambiguous, never settled by load order ----------------------------

USE_RTN = """
import json, sys, quantplug
from quantplug import AmbiguousBackendError
out = {}
calls = {
    "get_backend": lambda: quantplug.get_backend("rtn"),
    "config_from_dict": lambda: quantplug.config_from_dict({"quant_method": "rtn", "bits": 4}),
    "AutoQuantizer": lambda: quantplug.AutoQuantizer.from_config({"quant_method": "rtn", "bits": 4}),
}
for name, call in calls.items():
    try:
        call()
        out[name] = "ok"
    except AmbiguousBackendError as exc:
        out[name] = str(exc)
out["torch"] = "torch" in sys.modules
from quantplug.testing import tiny_llama
for name, call in {
    "quantize": lambda: quantplug.quantize(tiny_llama(), {"quant_method": "rtn", "bits": 4}, progress=False),
    "load": lambda: quantplug.load(sys.argv[1]),
}.items():
    try:
        call()
        out[name] = "ok"
    except AmbiguousBackendError as exc:
        out[name] = str(exc)
out["backends"] = [b.name for b in quantplug.backends()]
print(json.dumps(out))
"""


def test_an_impostor_that_loads_first_does_not_take_rtn(run, rtn_checkpoint):
    proc = run(["-c", USE_RTN, str(rtn_checkpoint[0])])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out.pop("torch") is False  # the ambiguity is found from metadata alone
    assert "rtn" not in out.pop("backends")
    for call, msg in out.items():
        assert "quant_method 'rtn' is ambiguous: 2 installed plugins register it, " in msg, call
        assert f"{IMPOSTOR} (plugin aaa_duprtn) and quantplug-rtn (plugin rtn)" in msg, call
        assert (
            "to use quantplug-rtn's, set QUANTPLUG_DISABLE_PLUGINS=aaa_duprtn, or load only it with QUANTPLUG_PLUGINS=rtn"
            in msg
        )
        assert f"to use {IMPOSTOR}'s, set QUANTPLUG_DISABLE_PLUGINS=rtn" in msg
    assert out["load"].startswith(str(rtn_checkpoint[0]))  # load names the config it read


def test_doctor_and_list_report_the_ambiguous_name(run):
    proc = run(["-m", "quantplug.cli", "doctor"])
    assert proc.returncode == 1
    blocks = dict(_problem_blocks(proc.stdout))
    mine = {p: f for p, f in blocks.items() if "(backend 'rtn')" in p}
    assert len(mine) == 2, proc.stdout
    assert any(
        p.startswith(
            f"{IMPOSTOR} (backend 'rtn'): registers backend 'rtn', which quantplug-rtn (plugin rtn) also "
            "registers: the name is ambiguous, so none of them is used"
        )
        for p in mine
    )
    assert any(
        p.startswith("quantplug-rtn (backend 'rtn'): registers backend 'rtn', which " + IMPOSTOR)
        for p in mine
    )
    assert all(
        "QUANTPLUG_DISABLE_PLUGINS=aaa_duprtn" in f and "QUANTPLUG_DISABLE_PLUGINS=rtn" in f
        for f in mine.values()
    )
    assert "plugin rtn [quantplug-rtn" in proc.stdout and "loaded -> backends: rtn (ambiguous)" in proc.stdout

    listing = run(["-m", "quantplug.cli", "list"])
    assert listing.returncode == 0
    assert not [line for line in listing.stdout.splitlines() if line.split()[:1] == ["rtn"]]
    assert f"ambiguous: rtn is registered by {IMPOSTOR} and quantplug-rtn; neither is used" in listing.stdout
    data = json.loads(run(["-m", "quantplug.cli", "list", "--json"]).stdout)
    assert data["ambiguous_backends"] == {"rtn": [IMPOSTOR, "quantplug-rtn"]}
    assert "rtn" not in [b["name"] for b in data["backends"]]


EVERY_OTHER = """
import json, sys, quantplug
out = {}
for method, config in json.loads(sys.argv[1]).items():
    backend = quantplug.get_backend(method)
    cfg = quantplug.config_from_dict({"quant_method": method, **config})
    out[method] = [backend.available, backend.plugin, type(cfg).__name__]
print(json.dumps(out))
"""


def test_every_other_backend_keeps_working(run):
    methods = [m for m in installed_methods() if m != "rtn"] + ["test-slow"]
    proc = run(["-c", EVERY_OTHER, json.dumps({m: CHEAP_CONFIGS.get(m, {}) for m in methods})])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert sorted(out) == sorted(methods)
    assert all(available for available, _, _ in out.values()), out
    assert out["test-slow"][1] == SLOW


WHO_OWNS_RTN = """
import json, quantplug
backend = quantplug.get_backend("rtn")
cfg = quantplug.config_from_dict({"quant_method": "rtn", "bits": 4, "group_size": 32})
print(json.dumps({"plugin": backend.plugin, "config": type(cfg).__module__, "quantizer": backend.quantizer,
                  "problems": [p.backend for p in quantplug.problems()]}))
"""


@pytest.mark.parametrize(
    ("disable", "owner", "module"),
    [("aaa_duprtn", "quantplug-rtn", "quantplug_rtn.config"), ("quantplug-rtn", IMPOSTOR, "qpt_aaa_duprtn")],
    ids=["disable-impostor", "disable-rtn"],
)
def test_disabling_one_claimant_gives_the_name_to_the_other(run, disable, owner, module):
    proc = run(["-c", WHO_OWNS_RTN], QUANTPLUG_DISABLE_PLUGINS=disable)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["plugin"], out["config"]) == (owner, module)
    assert "rtn" not in out["problems"]


def test_allow_listing_one_claimant_gives_it_the_name(run):
    proc = run(["-c", WHO_OWNS_RTN], QUANTPLUG_PLUGINS="rtn")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plugin"] == "quantplug-rtn"


def test_rtn_quantizes_normally_once_the_impostor_is_disabled(run):
    code = (
        "import torch, quantplug\nlin = torch.nn.Linear(64, 32)\n"
        "q = quantplug.AutoQuantizer.from_config({'quant_method': 'rtn', 'bits': 4}).quantize_module('l', lin)\n"
        "print(type(q).__module__, type(q).__name__)"
    )
    proc = run(["-c", code], QUANTPLUG_DISABLE_PLUGINS="aaa_duprtn")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[1] == "RtnLinear" and proc.stdout.startswith("quantplug_rtn")


# -- a slow plugin is named ---------------------------------------------------------------------------


def test_doctor_names_a_plugin_whose_import_is_slow(run):
    proc = run(["-m", "quantplug.cli", "doctor"])
    blocks = _problem_blocks(proc.stdout)
    slow = [(p, f) for p, f in blocks if p.startswith(f"{SLOW}: importing")]
    assert len(slow) == 1, proc.stdout
    problem, fix = slow[0]
    seconds = float(re.search(r"takes (\d+\.\d+) s", problem).group(1))
    assert seconds >= 0.6
    assert "importing its entry point module 'qpt_slowimport' takes" in problem
    assert (
        "(over 0.5 s), which every quantplug command that quantizes or loads with it pays, and "
        "`quantplug list` too whenever its descriptors are not cached (after each install)"
    ) in problem
    assert fix.startswith(
        "keep the entry point module light: import the backend's library in the quantizer module"
    )
    assert "QUANTPLUG_DISABLE_PLUGINS=test-slowimport" in fix
    assert not [p for p, _ in blocks if "takes" in p and not p.startswith(SLOW)]  # the others are light
    assert re.search(
        r"plugin test-slowimport \[quantplug-test-slowimport 0\.0\.1\]: loaded -> backends: test-slow \[import \d+ ms\]",
        proc.stdout,
    )


def test_trace_prints_each_plugins_import_time(run, tmp_path):
    # an empty descriptor cache: every plugin is imported (test_descriptor_cache: the warm path)
    proc = run(
        ["-m", "quantplug.cli", "list"], QUANTPLUG_TRACE_PLUGINS="1", QUANTPLUG_CACHE_DIR=str(tmp_path)
    )
    assert proc.returncode == 0
    times = dict(re.findall(r"quantplug: plugin '([^']+)' imported in (\d+\.\d) ms", proc.stderr))
    assert {"rtn", "aaa_duprtn", "test-slowimport"} <= set(times), proc.stderr
    assert float(times["test-slowimport"]) >= 600


def test_plugin_info_carries_the_timings(run, tmp_path):
    code = (
        "import json, quantplug\n"
        "print(json.dumps({p.name: [p.import_seconds, p.hook_seconds, p.cached] for p in quantplug.plugins()}))"
    )
    cache = str(tmp_path)
    for cached in (False, True):  # imported, then read from the descriptor cache with the same figures
        proc = run(["-c", code], QUANTPLUG_PLUGINS="rtn,test-slowimport", QUANTPLUG_CACHE_DIR=cache)
        times = json.loads(proc.stdout)
        assert times["test-slowimport"][0] >= 0.6 and times["test-slowimport"][1] >= 0
        assert times["rtn"][0] < 0.5
        assert times["test-slowimport"][2] is cached and times["rtn"][2] is cached


# -- typos in the plugin lists -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "typo", "near"),
    [
        ("QUANTPLUG_PLUGINS", "rtn,test-slowimport,rnt", "rnt", "rtn"),
        (
            "QUANTPLUG_DISABLE_PLUGINS",
            "aaa_duprtn,quantplug-test-slowimprt",
            "quantplug-test-slowimprt",
            SLOW,
        ),
    ],
)
def test_a_name_matching_no_installed_plugin_is_a_problem(run, var, value, typo, near):
    proc = run(["-m", "quantplug.cli", "doctor"], **{var: value})
    blocks = _problem_blocks(proc.stdout)
    ((problem, fix),) = [(p, f) for p, f in blocks if p.startswith(f"{var}: ")]
    assert f"{var}: {typo!r} matches no installed plugin, so it has no effect (installed plugins: " in problem
    assert "rtn [quantplug-rtn]" in problem and f"aaa_duprtn [{IMPOSTOR}]" in problem
    assert fix == (
        f"correct or remove {typo!r} in {var} (did you mean {near!r}?): use an entry point or distribution "
        "name of an installed plugin"
    )
    assert proc.returncode == 1


def test_list_says_every_plugin_is_disabled_by_the_allow_list(run):
    proc = run(["-m", "quantplug.cli", "list"], QUANTPLUG_PLUGINS="rnt")
    assert proc.returncode == 0
    assert "No backends installed" not in proc.stdout and "pip install" not in proc.stdout
    assert re.search(r"No backends enabled: \d+ plugin\(s\) are installed but disabled\.", proc.stdout)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("Disabled by"))
    assert line.startswith("Disabled by QUANTPLUG_PLUGINS (set to 'rnt'): ")
    assert "aaa_duprtn" in line and "rtn" in line and "test-slowimport" in line
    assert "1 plugin problem(s); run `quantplug doctor`" in proc.stderr
