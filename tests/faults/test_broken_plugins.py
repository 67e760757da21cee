"""Real, installed, broken plugins (no mocks): tiny distributions with ``[project.entry-points.quantplug]``
are pip-installed into a temporary directory, and fresh ``python`` processes with that directory on
``PYTHONPATH`` run the CLI and the dispatcher. One broken plugin must never break the others.

The six faults: an import error, an exception in ``register_backends``, an invalid descriptor, a
duplicate backend name, a missing backend library, and a library outside the supported version range.
For each, ``quantplug doctor`` names the plugin, the problem and the fix, ``quantplug list`` still
runs, and every other installed backend keeps working (bitwise as without the broken plugins). The
duplicate name ('rtn') is ambiguous: neither claimant is used until one is disabled, as the fix says.

``install_plugins`` builds and pip-installs such distributions; tests/faults/test_discovery_trust.py
uses it too.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from ._support import CHEAP_CONFIGS, installed_methods

CONFIG_SOURCE = """
import dataclasses
import quantplug


@dataclasses.dataclass(frozen=True)
class Config(quantplug.QuantConfig):
    quant_method = {method!r}
    bits: int = 4
"""

BROKEN = {
    # entry point name: (distribution name, module source)
    "test-importerror": (
        "quantplug-test-importerror",
        'raise ImportError("simulated: libfoo.so cannot be opened")\n',
    ),
    "test-hookraises": (
        "quantplug-test-hookraises",
        CONFIG_SOURCE.format(method="test-hookraises")
        + textwrap.dedent(
            """
            @quantplug.hookimpl
            def register_backends(register):
                register(quantplug.Backend(name="test-hookraises", config=Config, quantizer="x:Y",
                                           capabilities=quantplug.Capabilities(bits=(4,))))
                raise RuntimeError("simulated bug in register_backends")
            """
        ),
    ),
    "test-baddescriptor": (
        "quantplug-test-baddescriptor",
        CONFIG_SOURCE.format(method="Bad Descriptor")
        + textwrap.dedent(
            """
            @quantplug.hookimpl
            def register_backends(register):
                register(quantplug.Backend(name="Bad Descriptor", config=Config, quantizer="no colon here",
                                           capabilities=quantplug.Capabilities(bits=())))
            """
        ),
    ),
    "test-duprtn": (
        "quantplug-test-duprtn",
        CONFIG_SOURCE.format(method="rtn")
        + textwrap.dedent(
            """
            @quantplug.hookimpl
            def register_backends(register):
                register(quantplug.Backend(name="rtn", config=Config, quantizer="qpt_duprtn:Impostor",
                                           capabilities=quantplug.Capabilities(bits=(4,))))
            """
        ),
    ),
    "test-missinglib": (
        "quantplug-test-missinglib",
        CONFIG_SOURCE.format(method="test-missinglib")
        + textwrap.dedent(
            """
            @quantplug.hookimpl
            def register_backends(register):
                register(quantplug.Backend(name="test-missinglib", config=Config, quantizer="qpt_missinglib:Q",
                                           capabilities=quantplug.Capabilities(bits=(4,)),
                                           requires=("quantplug-test-no-such-library>=1.0",)))
            """
        ),
    ),
    "test-outofrange": (
        "quantplug-test-outofrange",
        CONFIG_SOURCE.format(method="test-outofrange")
        + textwrap.dedent(
            """
            @quantplug.hookimpl
            def register_backends(register):
                register(quantplug.Backend(name="test-outofrange", config=Config, quantizer="qpt_outofrange:Q",
                                           capabilities=quantplug.Capabilities(bits=(4,)),
                                           requires=("pluggy<0.1",)))
            """
        ),
    ),
}

# entry point name -> (text in the problem, text in the fix)
EXPECTED = {
    "test-importerror": (
        "failed to import 'qpt_importerror': ImportError: simulated: libfoo.so cannot be opened",
        "pip install --force-reinstall quantplug-test-importerror",
    ),
    "test-hookraises": (
        "register_backends raised RuntimeError: simulated bug in register_backends",
        "QUANTPLUG_DISABLE_PLUGINS=test-hookraises",
    ),
    "test-baddescriptor": (
        "invalid backend descriptor: name 'Bad Descriptor' must be a lowercase identifier",
        "report this to the maintainers of quantplug-test-baddescriptor",
    ),
    "test-duprtn": (
        "registers backend 'rtn', which quantplug-rtn (plugin rtn) also registers: the name is ambiguous",
        "to use quantplug-rtn's, set QUANTPLUG_DISABLE_PLUGINS=test-duprtn",
    ),
    "test-missinglib": (
        "quantplug-test-no-such-library is not installed",
        "pip install 'quantplug-test-no-such-library>=1.0'",
    ),
    "test-outofrange": (
        f"pluggy {version('pluggy')} is installed, but quantplug-test-outofrange supports <0.1",
        "quantplug-test-outofrange is incompatible with this quantplug: it needs pluggy<0.1",
    ),
}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _module_name(ep_name: str) -> str:
    return "qpt_" + ep_name.removeprefix("test-").replace("-", "_")


def install_plugins(root: Path, plugins: dict[str, tuple[str, str]]) -> Path:
    """pip-install into ``root/site`` one distribution per ``plugins`` entry (entry point name:
    (distribution name, source of its one module, ``qpt_<name>``)); returns that directory, to put
    on PYTHONPATH. Skips the test when pip or setuptools is missing."""
    # importlib.metadata, not importlib.util.find_spec: finding "pip" makes setuptools' distutils shim
    # step aside for the rest of the process, and a later `import setuptools` (optimum-quanto's
    # import does one) then fails its assertion about which distutils was imported
    missing = [m for m in ("pip", "setuptools") if not _installed(m)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not importable in {sys.executable}: cannot pip-install the broken "
            f"test plugins (add {', '.join(missing)} to this environment's dependencies to run these tests)"
        )
    sources = []
    for ep_name, (dist, source) in plugins.items():
        module = _module_name(ep_name)
        src = root / "src" / dist
        src.mkdir(parents=True)
        (src / f"{module}.py").write_text(source)
        (src / "pyproject.toml").write_text(
            textwrap.dedent(
                f"""
                [build-system]
                requires = ["setuptools>=61"]
                build-backend = "setuptools.build_meta"

                [project]
                name = "{dist}"
                version = "0.0.1"
                dependencies = ["quantplug"]

                [project.entry-points.quantplug]
                {ep_name} = "{module}"

                [tool.setuptools]
                py-modules = ["{module}"]
                """
            )
        )
        sources.append(str(src))
    target = root / "site"
    proc = pip_install(target, *sources)
    assert proc.returncode == 0, f"pip install of the test plugins failed:\n{proc.stdout}\n{proc.stderr}"
    for dist in (d for d, _ in plugins.values()):
        assert list(target.glob(f"{dist.replace('-', '_')}-0.0.1.dist-info")), f"{dist} was not installed"
    return target


def pip_install(target: Path, *args: str) -> subprocess.CompletedProcess:
    """pip-install local source folders (``args``, with any extra pip options) into ``target``,
    offline: no dependencies, no build isolation, no index."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--disable-pip-version-check", "--target", str(target), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A directory holding the six broken plugins, pip-installed (built once per module)."""
    return install_plugins(tmp_path_factory.mktemp("broken_plugins"), BROKEN)


@pytest.fixture
def run(broken_site, subprocess_env):
    """``run(args, **env)``: ``python <args>`` in a fresh process with the broken plugins installed."""

    def run_(args: list[str], *, with_broken: bool = True, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=subprocess_env(broken_site if with_broken else None, **env),
        )

    return run_


def _problem_blocks(doctor_output: str) -> list[tuple[str, str]]:
    """(problem line, fix line) pairs from the problem list ``doctor`` prints."""
    lines = doctor_output.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.startswith("- "):
            fix = lines[i + 1].strip() if i + 1 < len(lines) else ""
            assert fix.startswith("fix: "), f"problem without a fix line:\n{doctor_output}"
            blocks.append((line[2:], fix[5:]))
    return blocks


def test_doctor_names_each_broken_plugin_its_problem_and_a_fix(run):
    proc = run(["-m", "quantplug.cli", "doctor"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    blocks = _problem_blocks(out)
    assert f"\n{len(blocks)} problem(s):" in out
    for ep_name, (dist, _) in BROKEN.items():
        problem_text, fix_text = EXPECTED[ep_name]
        mine = [(p, f) for p, f in blocks if p.startswith(dist)]
        assert len(mine) == 1, f"{dist}: expected exactly one problem in:\n{out}"
        (problem, fix) = mine[0]
        assert problem_text in problem, out
        assert fix_text in fix, out
        assert f"plugin {ep_name} [{dist} 0.0.1]" in out
    assert len([p for p, _ in blocks if p.startswith("quantplug-test-")]) == len(BROKEN)
    assert "plugin rtn [quantplug-rtn" in out and "loaded -> backends: rtn (ambiguous)" in out
    (rtn_problem,) = [(p, f) for p, f in blocks if p.startswith("quantplug-rtn")]
    assert (
        "registers backend 'rtn', which quantplug-test-duprtn (plugin test-duprtn) also registers"
        in rtn_problem[0]
    )


def test_doctor_statuses_per_plugin(run):
    out = run(["-m", "quantplug.cli", "doctor"]).stdout
    statuses = {
        line.split()[1]: line.split("]: ", 1)[1].split()[0]
        for line in out.splitlines()
        if line.startswith("  plugin ")
    }
    assert (
        statuses.items()
        >= {
            "rtn": "loaded",
            "test-importerror": "failed",
            "test-hookraises": "failed",
            "test-baddescriptor": "loaded",  # loaded, but its only backend was rejected
            "test-duprtn": "loaded",
            "test-missinglib": "loaded",
            "test-outofrange": "loaded",
        }.items()
    ), statuses


def test_list_still_works_and_shows_rtn_ambiguous(run):
    proc = run(["-m", "quantplug.cli", "list"])
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert "rtn" not in rows  # neither claimant of the name is usable
    assert (
        "ambiguous: rtn is registered by quantplug-rtn and quantplug-test-duprtn; neither is used"
        in proc.stdout
    )
    assert "unavailable: quantplug-test-no-such-library is not installed" in rows["test-missinglib"]
    assert "unavailable: pluggy" in rows["test-outofrange"]
    assert "test-hookraises" not in rows and "Bad" not in proc.stdout
    assert "plugin problem(s); run `quantplug doctor`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_list_json_with_broken_plugins(run):
    proc = run(["-m", "quantplug.cli", "list", "--json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    by_name = {b["name"]: b for b in data["backends"]}
    assert {"test-missinglib", "test-outofrange"} <= set(by_name)
    assert not {"rtn", "test-hookraises", "Bad Descriptor"} & set(by_name)
    assert data["ambiguous_backends"] == {"rtn": ["quantplug-rtn", "quantplug-test-duprtn"]}
    assert by_name["test-missinglib"]["available"] is False
    assert by_name["test-missinglib"]["fix"] == "pip install 'quantplug-test-no-such-library>=1.0'"
    assert by_name["test-outofrange"]["libraries"] == {"pluggy": version("pluggy")}
    problem_plugins = {
        p["plugin"] for p in data["plugin_problems"] if p["plugin"].startswith("quantplug-test-")
    }
    assert problem_plugins == {
        "quantplug-test-importerror",
        "quantplug-test-hookraises",
        "quantplug-test-baddescriptor",
        "quantplug-test-duprtn",
    }


QUANTIZE = """
import json, torch, quantplug
torch.manual_seed(0)
lin = torch.nn.Linear(64, 32)
q = quantplug.AutoQuantizer.from_config({"quant_method": "rtn", "bits": 4}).quantize_module("l", lin)
x = torch.randn(16, 64)
with torch.no_grad():
    err = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
backend = quantplug.get_backend("rtn")
print(json.dumps({"err": err, "type": type(q).__name__, "plugin": backend.plugin,
                  "bound": backend.capabilities.max_rel_error[4],
                  "problems": sorted({p.plugin for p in quantplug.problems()})}))
"""


def test_rtn_still_quantizes_with_broken_plugins_installed_once_the_impostor_is_disabled(run):
    proc = run(["-c", QUANTIZE])
    assert proc.returncode == 1
    assert "AmbiguousBackendError: quant_method 'rtn' is ambiguous" in proc.stderr
    proc = run(["-c", QUANTIZE], QUANTPLUG_DISABLE_PLUGINS="test-duprtn")  # doctor's fix
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["plugin"] == "quantplug-rtn"
    assert result["type"] == "RtnLinear"
    assert 0 < result["err"] < result["bound"]
    assert {dist for dist, _ in BROKEN.values()} - {"quantplug-test-duprtn"} <= set(result["problems"])
    assert "quantplug-test-duprtn" not in result["problems"]


EVERY_BACKEND = """
import copy, json, sys, torch, quantplug
from safetensors.torch import save_file
torch.manual_seed(0)
lin = torch.nn.Linear(128, 64)
x = torch.randn(4, 128)
out, status = {}, {}
for method, config in json.loads(sys.argv[1]).items():
    try:
        backend = quantplug.get_backend(method)
    except quantplug.AmbiguousBackendError as exc:
        status[method] = ["ambiguous", str(exc)]
        continue
    status[method] = [backend.available, backend.plugin]
    quantizer = quantplug.AutoQuantizer.from_config({"quant_method": method, **config})
    with torch.no_grad():
        out[method] = quantizer.quantize_module("l", copy.deepcopy(lin))(x).contiguous()
save_file(out, sys.argv[2])
print(json.dumps({"status": status, "problems": sorted({p.plugin for p in quantplug.problems()})}))
"""


def test_every_installed_backend_works_the_same_with_broken_plugins_installed(run, tmp_path):
    """Not just rtn: each backend installed here (all five in the integration env) is available and
    quantizes a layer bitwise as it does without the broken plugins, except rtn, whose name the
    impostor made ambiguous (rtn with the impostor disabled: the test above)."""
    from safetensors.torch import load_file

    configs = json.dumps({m: CHEAP_CONFIGS.get(m, {}) for m in installed_methods()})
    results = {}
    for with_broken in (False, True):
        out = tmp_path / f"{with_broken}.safetensors"
        proc = run(["-c", EVERY_BACKEND, configs, str(out)], with_broken=with_broken)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[with_broken] = json.loads(proc.stdout.strip().splitlines()[-1]), load_file(out)
    (clean, clean_out), (broken, broken_out) = results[False], results[True]
    ambiguous = broken["status"].pop("rtn")
    assert ambiguous[0] == "ambiguous" and "quantplug-test-duprtn (plugin test-duprtn)" in ambiguous[1]
    assert clean["status"].pop("rtn") == [True, "quantplug-rtn"]
    assert clean["status"] == broken["status"]
    assert all(available for available, _ in broken["status"].values()), broken["status"]
    others = [m for m in installed_methods() if m != "rtn"]
    assert sorted(broken_out) == others and sorted(clean_out) == installed_methods()
    for method in others:
        assert torch.equal(broken_out[method], clean_out[method]), method
    assert not [p for p in clean["problems"] if p.startswith("quantplug-test-")]
    assert {dist for dist, _ in BROKEN.values()} <= set(broken["problems"])


def test_disabling_the_broken_plugins_as_doctor_suggests_makes_it_clean(run):
    proc = run(
        ["-m", "quantplug.cli", "doctor"],
        QUANTPLUG_PLUGINS=",".join(["rtn", *BROKEN]),  # plugins installed in the env itself stay out
        QUANTPLUG_DISABLE_PLUGINS=",".join(BROKEN),
    )
    assert proc.returncode == 0, proc.stdout
    assert "No problems found." in proc.stdout
    for ep_name in BROKEN:
        assert f"plugin {ep_name} " in proc.stdout and "disabled by QUANTPLUG_DISABLE_PLUGINS" in proc.stdout


def test_allow_list_loads_only_the_named_plugins(run):
    proc = run(["-m", "quantplug.cli", "list", "--json"], QUANTPLUG_PLUGINS="rtn,quantplug-test-missinglib")
    data = json.loads(proc.stdout)
    assert [b["name"] for b in data["backends"]] == ["rtn", "test-missinglib"]
    assert data["plugin_problems"] == []


def test_empty_allow_list_gives_no_backends(run):
    proc = run(["-m", "quantplug.cli", "list", "--json"], QUANTPLUG_PLUGINS="")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["backends"] == [] and data["plugin_problems"] == []
    proc = run(["-m", "quantplug.cli", "doctor"], QUANTPLUG_PLUGINS="")
    assert proc.returncode == 0 and "No problems found." in proc.stdout


LAZY = """
import json, sys
import quantplug
quantplug.backends()
quantplug.problems()
quantplug.config_from_dict({"quant_method": "rtn", "bits": 4})
before = {m: m in sys.modules for m in ("torch", "quantplug_rtn", "quantplug_rtn.quantizer")}
quantplug.AutoQuantizer.from_config({"quant_method": "rtn", "bits": 4})
after = {m: m in sys.modules for m in ("torch", "quantplug_rtn.quantizer")}
print(json.dumps({"before": before, "after": after}))
"""


@pytest.mark.parametrize("with_broken", [False, True], ids=["clean", "with-broken-plugins"])
def test_listing_and_validating_never_import_torch_or_the_quantizer(run, with_broken):
    # the impostor makes 'rtn' ambiguous; the error path is torch-free too (test_discovery_trust)
    proc = run(["-c", LAZY], with_broken=with_broken, QUANTPLUG_DISABLE_PLUGINS="test-duprtn")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["before"] == {"torch": False, "quantplug_rtn": True, "quantplug_rtn.quantizer": False}
    # the positive control: the first real use imports them
    assert result["after"] == {"torch": True, "quantplug_rtn.quantizer": True}


def test_cli_list_does_not_import_torch(run):
    code = "import sys; from quantplug.cli import main\ntry:\n    main(['list'])\nexcept SystemExit: pass\n"
    code += "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"
    proc = run(["-c", code])
    assert proc.stderr.strip().splitlines()[-1] == "NO-TORCH", proc.stderr


def test_trace_in_a_fresh_process_shows_every_plugin(run, tmp_path):
    cache = str(tmp_path)  # an empty descriptor cache: every plugin is imported
    proc = run(["-m", "quantplug.cli", "list"], QUANTPLUG_TRACE_PLUGINS="1", QUANTPLUG_CACHE_DIR=cache)
    assert proc.returncode == 0
    for ep_name in ["rtn", *BROKEN]:
        assert f"quantplug: loading plugin '{ep_name}'" in proc.stderr
    assert "problem in test-importerror" in proc.stderr
    assert "quantplug: plugin 'rtn' imported in " in proc.stderr
    # the second time, the plugins that loaded cleanly are read from the descriptor cache; those
    # with a problem are never cached: they are imported (and their problem found) every time
    again = run(["-m", "quantplug.cli", "list"], QUANTPLUG_TRACE_PLUGINS="1", QUANTPLUG_CACHE_DIR=cache)
    assert again.stdout == proc.stdout
    # (the impostor's descriptor is valid: 'rtn' is found ambiguous again from the cached descriptors)
    for ep_name in ["rtn", "test-missinglib", "test-outofrange", "test-duprtn"]:
        assert f"quantplug: plugin '{ep_name}' (quantplug-" in again.stderr
        assert f"quantplug: loading plugin '{ep_name}'" not in again.stderr
    assert "backend 'rtn' is ambiguous: quantplug-rtn, quantplug-test-duprtn" in again.stderr
    for ep_name in ["test-importerror", "test-hookraises", "test-baddescriptor"]:
        assert f"quantplug: loading plugin '{ep_name}'" in again.stderr
    assert "problem in test-importerror" in again.stderr


def test_pythonpath_is_what_installs_the_broken_plugins(run):
    # the control: without the target directory on PYTHONPATH the same command is clean
    proc = run(["-m", "quantplug.cli", "doctor"], with_broken=False)
    assert "plugin rtn [quantplug-rtn" in proc.stdout
    assert "quantplug-test-" not in proc.stdout
    assert os.environ.get("QUANTPLUG_PLUGINS") is None
