"""The descriptor cache (``quantplug.descriptor_cache``, issue 28 item 7), with really pip-installed
plugins run in fresh processes: a plugin whose entry point module sleeps 1 s on import (and writes
a line to ``$QPT_CACHE_MARK`` each time it is imported) is imported by the first ``quantplug list``
and not by the next ones, nor by ``get_backend`` or ``select``; it is imported when its config
class is really needed. An edit of its module, a new version, a corrupt record or an invalid one
make quantplug import it again; ``doctor`` always imports, so a plugin that no longer imports is
named although its descriptors are cached.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ._support import record
from .test_broken_plugins import CONFIG_SOURCE, install_plugins, pip_install

SLOW = "quantplug-test-cacheslow"
MODULE = "qpt_cacheslow"

PLUGIN_SOURCE = (
    "import os\nimport time\n\n"
    "time.sleep(1.0)  # a heavy library imported at the top of the entry point module\n"
    'if os.environ.get("QPT_CACHE_MARK"):\n'
    '    with open(os.environ["QPT_CACHE_MARK"], "a") as f:\n'
    '        f.write("imported\\n")\n'
    "import qpt_cachehelper  # noqa: F401  (a module beside it; removing it breaks this plugin)\n"
    + CONFIG_SOURCE.format(method="test-cacheslow")
    + textwrap.dedent(
        """
        @quantplug.hookimpl
        def register_backends(register):
            register(quantplug.Backend(
                name="test-cacheslow", config=Config, quantizer="qpt_cacheslow:Q",
                capabilities=quantplug.Capabilities(bits=(4, 8), max_rel_error={4: 0.2, 8: 0.02}),
                presets=(
                    quantplug.Preset("int4", {"bits": 4}, bits=4, bits_per_weight=4.5, rel_error=0.1),
                    # a config object: cached as its to_dict(), which must build an equal config
                    quantplug.Preset("int8", Config(bits=8), bits=8, bits_per_weight=8.5, rel_error=0.01),
                ),
            ))
        """
    )
)


@pytest.fixture
def site(tmp_path) -> Path:
    """The slow plugin, pip-installed (per test: some tests change or break it)."""
    target = install_plugins(tmp_path / "install", {"test-cacheslow": (SLOW, PLUGIN_SOURCE)})
    (target / "qpt_cachehelper.py").write_text("")
    return target


@pytest.fixture
def run(site, tmp_path, subprocess_env):
    """``run(args)``: python with the slow plugin installed, its own descriptor cache and mark file."""
    env = subprocess_env(
        site,
        QUANTPLUG_CACHE_DIR=str(tmp_path / "cache"),
        QPT_CACHE_MARK=str(tmp_path / "mark"),
        QUANTPLUG_TRACE_PLUGINS="1",
    )

    def run_(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)

    return run_


def imports(tmp_path: Path) -> int:
    """How many times the slow plugin's module was imported so far (its side effect)."""
    mark = tmp_path / "mark"
    return len(mark.read_text().splitlines()) if mark.exists() else 0


def records(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "plugins").glob("test-cacheslow-*.txt"))


def descriptors(text: str) -> dict:
    """A record without the timings of the import that wrote it."""
    data = ast.literal_eval(text)
    return {k: v for k, v in data.items() if not k.endswith("_seconds")}


LIST = ["-m", "quantplug.cli", "list"]
READ = f"quantplug: plugin 'test-cacheslow' ({SLOW} 0.0.1) read from the descriptor cache, not imported"

USE = """
import json, sys, quantplug
out = {}
backend = quantplug.get_backend("test-cacheslow")
out["get_backend"] = [type(backend).__name__, backend.plugin, "qpt_cacheslow" in sys.modules]
sel = quantplug.select(7e9, device="cpu")
label = "test-cacheslow:int4"
mine = next(c for c in sel.candidates if c.label == label)
text = sel.table()
data = json.loads(json.dumps(sel.to_dict()))
config = next(c["config"] for c in data["candidates"] if c["backend"] == "test-cacheslow" and c["preset"] == "int4")
out["select"] = [label in text, config, "qpt_cacheslow" in sys.modules]
out["presets"] = [[p.name, dict(p.config)] for p in backend.presets]
# the positive control: the config object itself needs the plugin's class
out["int8"] = backend.presets[1].build(backend.config).to_dict()
out["config"] = [type(mine.config).__module__, mine.config.to_dict(), "qpt_cacheslow" in sys.modules]
print(json.dumps(out))
"""


def test_a_warm_cache_lists_and_selects_without_importing_the_plugin(run, tmp_path):
    t0 = time.perf_counter()
    cold = run(LIST)
    cold_s = time.perf_counter() - t0
    assert cold.returncode == 0, cold.stderr
    assert "quantplug: loading plugin 'test-cacheslow'" in cold.stderr
    assert imports(tmp_path) == 1 and len(records(tmp_path)) == 1
    t0 = time.perf_counter()
    warm = run(LIST)
    warm_s = time.perf_counter() - t0
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout == cold.stdout and "test-cacheslow" in warm.stdout
    assert READ in warm.stderr and "loading plugin 'test-cacheslow'" not in warm.stderr
    assert imports(tmp_path) == 1  # the module was not imported: its sleep and its mark did not happen
    record("descriptor_cache_list", cold_s=round(cold_s, 2), warm_s=round(warm_s, 2))

    proc = run(["-c", USE])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["get_backend"] == ["CachedBackend", SLOW, False]
    assert out["select"][0] is True and out["select"][2] is False
    assert out["presets"] == [["int4", {"bits": 4}], ["int8", out["int8"]]]
    assert out["select"][1]["bits"] == 4
    # the JSON's config (the one recorded in the cache) is the one the plugin's class builds
    assert out["config"] == [MODULE, out["select"][1], True]
    assert imports(tmp_path) == 2  # imported once, when the config object was built


def test_an_edit_or_a_new_version_of_the_plugin_rebuilds_the_cache(run, site, tmp_path):
    assert run(LIST).returncode == 0 and imports(tmp_path) == 1
    module = site / f"{MODULE}.py"
    st = module.stat()
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # an editable install's edit
    proc = run(LIST)
    assert "loading plugin 'test-cacheslow'" in proc.stderr and imports(tmp_path) == 2
    assert READ in run(LIST).stderr and imports(tmp_path) == 2
    meta = next(site.glob("quantplug_test_cacheslow-0.0.1.dist-info")) / "METADATA"
    meta.write_text(meta.read_text().replace("Version: 0.0.1", "Version: 0.0.2"))  # an upgrade
    proc = run(LIST)
    assert "loading plugin 'test-cacheslow'" in proc.stderr and imports(tmp_path) == 3
    assert f"{SLOW} 0.0.2" in proc.stdout
    again = run(LIST)
    assert f"({SLOW} 0.0.2) read from the descriptor cache" in again.stderr and imports(tmp_path) == 3


def test_a_plugin_that_opts_out_is_imported_by_every_process(run, site, tmp_path):
    """quantplug-torchao's module quiets torchao's import, which Transformers triggers: it must run
    in every process that loads plugins, so it sets QUANTPLUG_CACHE_DESCRIPTORS = False."""
    assert run(LIST).returncode == 0 and imports(tmp_path) == 1 and len(records(tmp_path)) == 1
    module = site / f"{MODULE}.py"
    module.write_text(module.read_text() + "\nQUANTPLUG_CACHE_DESCRIPTORS = False\n")
    for n in (2, 3):
        proc = run(LIST)
        assert "loading plugin 'test-cacheslow'" in proc.stderr and "test-cacheslow" in proc.stdout
        # no record is written: the one left is the unedited module's (another key, never read again)
        assert imports(tmp_path) == n and len(records(tmp_path)) == 1 and READ not in proc.stderr


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: "\x00\xff garbage",
        lambda text: "__import__('os').system('echo pwned')",  # code is never run
        lambda text: text.replace("'name': 'test-cacheslow'", "'name': 'Not A Name'"),  # invalid descriptor
        lambda text: text.replace("'key': '", "'key': '0"),  # another key
        lambda text: text.replace("'qpt_cacheslow:Q'", "'no colon'"),  # invalid quantizer target
    ],
    ids=["truncated", "garbage", "code", "invalid-name", "wrong-key", "invalid-target"],
)
def test_a_corrupt_or_invalid_record_is_ignored_and_rewritten(run, tmp_path, damage):
    first = run(LIST)
    assert first.returncode == 0 and imports(tmp_path) == 1
    (file,) = records(tmp_path)
    good = file.read_text()
    file.write_text(damage(good), encoding="utf-8", errors="surrogateescape")
    proc = run(LIST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == first.stdout and "pwned" not in proc.stdout + proc.stderr
    assert "loading plugin 'test-cacheslow'" in proc.stderr and imports(tmp_path) == 2
    assert descriptors(file.read_text()) == descriptors(good)  # rewritten from the real import
    assert READ in run(LIST).stderr and imports(tmp_path) == 2


BROKEN_USE = """
import quantplug
try:
    quantplug.config_from_dict({"quant_method": "test-cacheslow", "bits": 4})
except quantplug.BackendUnavailableError as exc:
    print(exc)
"""


def test_a_plugin_that_no_longer_imports_is_named_by_doctor_and_on_first_use(run, site, tmp_path):
    helper = site / "qpt_cachehelper.py"
    assert run(LIST).returncode == 0 and len(records(tmp_path)) == 1
    helper.unlink()  # its files and version unchanged: the key is the same
    assert READ in run(LIST).stderr  # list trusts the unchanged key ...
    # ... the first real use of the config class says what is wrong and deletes the record
    used = run(["-c", BROKEN_USE])
    assert (
        "backend 'test-cacheslow': its config class 'qpt_cacheslow:Config', read from quantplug's"
        in used.stdout
    )
    assert "importing it failed: ModuleNotFoundError: No module named 'qpt_cachehelper'" in used.stdout
    assert "run `quantplug doctor`" in used.stdout
    assert records(tmp_path) == []
    helper.write_text("")
    assert run(LIST).returncode == 0 and len(records(tmp_path)) == 1
    helper.unlink()
    doctor = run(["-m", "quantplug.cli", "doctor"])  # ... and doctor always imports
    assert doctor.returncode == 1
    assert "failed to import 'qpt_cacheslow': ModuleNotFoundError: No module named 'qpt_cachehelper'" in (
        doctor.stdout
    )
    assert f"plugin test-cacheslow [{SLOW} 0.0.1]: failed" in doctor.stdout
    assert records(tmp_path) == []  # a plugin that fails is never left in the cache
    again = run(LIST)
    assert "loading plugin 'test-cacheslow'" in again.stderr and "test-cacheslow" not in again.stdout


def test_a_reinstall_of_the_same_version_rebuilds_the_cache(run, site, tmp_path):
    assert run(LIST).returncode == 0 and imports(tmp_path) == 1
    assert READ in run(LIST).stderr and imports(tmp_path) == 1
    proc = pip_install(site, "--upgrade", "--force-reinstall", str(tmp_path / "install" / "src" / SLOW))
    assert proc.returncode == 0, proc.stderr
    again = run(LIST)
    assert "loading plugin 'test-cacheslow'" in again.stderr and imports(tmp_path) == 2
    assert READ in run(LIST).stderr and imports(tmp_path) == 2
