"""The registry and the dispatcher: entry-point discovery, programmatic registration, per-plugin
error isolation, requirement checks, lazy quantizer import, unknown methods, env vars, threads.

Everything here runs against the real ``quantplug-rtn`` plugin found through its real entry point.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
from importlib.metadata import entry_points, version
from pathlib import Path

import pytest

import quantplug
from quantplug import (
    AmbiguousBackendError,
    AutoQuantizer,
    BackendUnavailableError,
    Capabilities,
    ConfigError,
    PluginError,
    UnknownMethodError,
)
from quantplug_rtn import RtnConfig

RTN_VERSION = version("quantplug-rtn")

# Only rtn is loaded (QUANTPLUG_PLUGINS=rtn), so exact listings hold in an env with more plugins.
pytestmark = pytest.mark.usefixtures("rtn_only")


def problems_of(plugin: str) -> list:
    return [p for p in quantplug.problems() if p.plugin == plugin]


def assert_rtn_still_works():
    """rtn dispatches, and quantizes a Linear, whatever else was registered."""
    import torch

    backend = quantplug.get_backend("rtn")
    assert backend.plugin == "quantplug-rtn"
    assert backend.available
    quantizer = AutoQuantizer.from_config({"quant_method": "rtn", "bits": 8})
    assert type(quantizer).__name__ == "RtnQuantizer"
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(4, 32)
    q = quantizer.quantize_module("l", lin)
    rel = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < backend.capabilities.max_rel_error[8]


# -- discovery --------------------------------------------------------------------------------------


def test_rtn_is_discovered_from_its_real_entry_point(monkeypatch):
    monkeypatch.delenv("QUANTPLUG_PLUGINS")  # the default: every installed plugin is loaded
    quantplug.reload_plugins()
    eps = [ep for ep in entry_points(group="quantplug") if ep.name == "rtn"]
    assert len(eps) == 1 and eps[0].value == "quantplug_rtn"
    backend = quantplug.get_backend("rtn")
    assert backend in quantplug.backends()
    assert backend.plugin == "quantplug-rtn"
    assert backend.plugin_version == RTN_VERSION
    assert backend.config is RtnConfig
    assert backend.quantizer == "quantplug_rtn.quantizer:RtnQuantizer"
    assert backend.available and backend.status.reason == ""
    info = {p.name: p for p in quantplug.plugins()}["rtn"]
    assert (info.status, info.dist, info.version, info.backends) == (
        "loaded",
        "quantplug-rtn",
        RTN_VERSION,
        ["rtn"],
    )
    assert problems_of("quantplug-rtn") == []


def test_backends_are_sorted_by_name(make_backend):
    for name in ("zeta", "alpha", "mid"):
        quantplug.register_backend(make_backend(name))
    names = [b.name for b in quantplug.backends()]
    assert names == sorted(names)
    assert {"alpha", "mid", "rtn", "zeta"} <= set(names)


def test_reload_plugins_drops_programmatic_registrations(make_backend):
    quantplug.register_backend(make_backend("ephemeral"))
    assert quantplug.get_backend("ephemeral").name == "ephemeral"
    quantplug.reload_plugins()
    with pytest.raises(UnknownMethodError):
        quantplug.get_backend("ephemeral")
    assert quantplug.get_backend("rtn").plugin == "quantplug-rtn"


# -- programmatic registration ----------------------------------------------------------------------


def test_register_backend_then_dispatch(make_backend):
    backend = make_backend("demo-inline")
    quantplug.register_backend(backend)
    got = quantplug.get_backend("demo-inline")
    assert got.name == "demo-inline" and got.config is backend.config
    assert got.plugin == "inline:demo-inline"
    quantizer = AutoQuantizer.from_config({"quant_method": "demo-inline", "bits": 8})
    assert isinstance(quantizer, quantplug.Quantizer)
    assert quantizer.backend is got
    assert quantizer.config == backend.config(bits=8)
    # a config object works as well as a dict
    assert AutoQuantizer.from_config(backend.config(bits=2)).config.bits == 2


def test_register_plugin_with_several_backends_and_unregister(make_backend, plugin_registering):
    plugin = plugin_registering([make_backend("multi-a"), make_backend("multi-b")])
    info = quantplug.register_plugin(plugin, name="multi")
    assert (info.status, info.backends) == ("loaded", ["multi-a", "multi-b"])
    assert {"multi-a", "multi-b"} <= {b.name for b in quantplug.backends()}
    assert quantplug.get_backend("multi-a").plugin == "multi"
    assert "multi" in {p.name for p in quantplug.plugins()}

    quantplug.unregister_plugin("multi")
    for name in ("multi-a", "multi-b"):
        with pytest.raises(UnknownMethodError):
            quantplug.get_backend(name)
    assert "multi" not in {p.name for p in quantplug.plugins()}
    assert quantplug.get_backend("rtn").plugin == "quantplug-rtn"


def test_unregister_unknown_plugin_raises_key_error_listing_plugins():
    with pytest.raises(KeyError, match="rtn"):
        quantplug.unregister_plugin("never-registered")


def test_unregister_removes_the_plugins_problems(make_backend, plugin_registering):
    quantplug.register_plugin(plugin_registering([make_backend("Bad Name")]), name="bad")
    assert problems_of("bad")
    quantplug.unregister_plugin("bad")
    assert quantplug.problems() == []


def test_register_backend_raises_plugin_error_on_invalid_descriptor_and_leaves_no_trace(
    rtn_only, make_backend
):
    with pytest.raises(PluginError, match="name 'Bad Name'"):
        quantplug.register_backend(make_backend("Bad Name"))
    assert quantplug.problems() == []
    assert [p.name for p in quantplug.plugins() if p.status != "disabled"] == ["rtn"]


def test_register_backend_raises_on_duplicate_name_and_leaves_no_trace(make_backend):
    with pytest.raises(PluginError, match="already registered by quantplug-rtn"):
        quantplug.register_backend(make_backend("rtn", config=RtnConfig))
    assert quantplug.get_backend("rtn").plugin == "quantplug-rtn"
    assert quantplug.problems() == []

    quantplug.register_backend(make_backend("twice"))
    with pytest.raises(PluginError):
        quantplug.register_backend(make_backend("twice"))
    assert quantplug.get_backend("twice").plugin == "inline:twice"
    assert quantplug.problems() == [], (
        "a registration that raised must not also leave a doctor problem behind"
    )


# -- broken plugins: each recorded with a fix, the others keep working -------------------------------


def test_plugin_whose_hook_raises_is_recorded_and_its_partial_registrations_discarded(
    make_backend, make_plugin
):
    partial = make_backend("partial-ok")

    def register_backends(register):
        register(partial)
        raise RuntimeError("simulated bug in register_backends")

    info = quantplug.register_plugin(make_plugin(register_backends), name="raiser")
    assert info.status == "failed"
    assert info.backends == []
    (problem,) = problems_of("raiser")
    assert "register_backends raised RuntimeError: simulated bug in register_backends" in problem.problem
    assert "QUANTPLUG_DISABLE_PLUGINS=raiser" in problem.fix
    with pytest.raises(UnknownMethodError):
        quantplug.get_backend("partial-ok")
    assert "partial-ok" not in {b.name for b in quantplug.backends()}
    assert_rtn_still_works()


def test_plugin_that_registers_a_non_backend(plugin_registering, make_backend):
    info = quantplug.register_plugin(
        plugin_registering([{"name": "dict-backend"}, make_backend("good-after-bad")]), name="nonbackend"
    )
    (problem,) = problems_of("nonbackend")
    assert "registered 'dict', not a quantplug.Backend" in problem.problem
    assert problem.fix
    # one bad registration does not discard the plugin's valid ones
    assert info.backends == ["good-after-bad"]
    assert quantplug.get_backend("good-after-bad").plugin == "nonbackend"
    assert_rtn_still_works()


@dataclasses.dataclass(frozen=True)
class OtherMethodConfig(quantplug.QuantConfig):
    quant_method = "something-else"
    bits: int = 4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"name": "Bad Name"}, "name 'Bad Name' must be a lowercase identifier"),
        ({"name": ""}, "must be a lowercase identifier"),
        ({"name": "UPPER"}, "must be a lowercase identifier"),
        ({"config": OtherMethodConfig}, "quant_method is 'something-else', but the backend is named"),
        ({"config": dict}, "config must be a QuantConfig subclass"),
        ({"quantizer": "quantplug.Quantizer"}, "quantizer must be a 'module:Class' string"),
        ({"quantizer": "mod:"}, "quantizer must be a 'module:Class' string"),
        ({"quantizer": quantplug.Quantizer}, "quantizer must be a 'module:Class' string"),
        ({"capabilities": Capabilities(bits=())}, "capabilities.bits must be a non-empty list"),
        ({"capabilities": Capabilities(bits=(4, 0))}, "capabilities.bits must be a non-empty list"),
        ({"capabilities": Capabilities(bits=("4",))}, "capabilities.bits must be a non-empty list"),
        ({"capabilities": Capabilities(bits=(True,))}, "capabilities.bits must be a non-empty list"),
        ({"capabilities": {"bits": (4,)}}, "capabilities must be a quantplug.Capabilities"),
        (
            {"requires": ("not a requirement!!",)},
            "requires entry 'not a requirement!!' is not a valid requirement",
        ),
        ({"requires": ("lib>=",)}, "is not a valid requirement"),
        ({"requires": (5,)}, "is not a valid requirement"),
    ],
)
def test_invalid_descriptor_is_recorded_with_a_fix_and_not_registered(
    overrides, expected, make_backend, plugin_registering
):
    overrides = dict(overrides)
    backend = make_backend(overrides.pop("name", "broken-desc"), **overrides)
    info = quantplug.register_plugin(plugin_registering([backend]), name="baddesc")
    assert info.backends == []
    (problem,) = problems_of("baddesc")
    assert problem.problem.startswith("invalid backend descriptor: ")
    assert expected in problem.problem
    assert "report this to the maintainers of baddesc" in problem.fix
    assert "QUANTPLUG_DISABLE_PLUGINS=baddesc" in problem.fix
    assert backend.name not in {b.name for b in quantplug.backends()}
    assert_rtn_still_works()


def test_requires_given_as_a_bare_string_is_one_requirement(make_backend):
    # requires=("torch") is a classic missing-comma slip; it must not turn into ('t', 'o', 'r', 'c', 'h')
    backend = make_backend("bare-req", requires="quantplug-test-no-such-lib")
    assert backend.requires == ("quantplug-test-no-such-lib",)
    caps = Capabilities(bits=(4,), devices="cuda")
    assert caps.devices == ("cuda",)


def test_duplicate_backend_name_makes_it_ambiguous_not_first_come(make_backend, plugin_registering):
    info = quantplug.register_plugin(
        plugin_registering([make_backend("rtn", config=RtnConfig, quantizer="elsewhere:Impostor")]),
        name="impostor",
    )
    assert info.backends == ["rtn"] and info.status == "loaded"
    # neither claimant is used: not the first registered, not the impostor
    assert "rtn" not in [b.name for b in quantplug.backends()]
    with pytest.raises(AmbiguousBackendError) as err:
        quantplug.get_backend("rtn")
    assert isinstance(err.value, UnknownMethodError) and isinstance(err.value, PluginError)
    assert err.value.method == "rtn"
    msg = str(err.value)
    assert "quant_method 'rtn' is ambiguous: 2 installed plugins register it" in msg
    assert "quantplug-rtn (plugin rtn) and impostor (registered at runtime)" in msg
    assert "to use quantplug-rtn's, set quantplug.unregister_plugin('impostor')" in msg
    assert "to use impostor's, set QUANTPLUG_DISABLE_PLUGINS=rtn, or load only" not in msg
    assert "to use impostor's, set QUANTPLUG_DISABLE_PLUGINS=rtn" in msg
    for call in (
        lambda: AutoQuantizer.from_config({"quant_method": "rtn", "bits": 4}),
        lambda: AutoQuantizer.from_config(RtnConfig(bits=4)),
        lambda: quantplug.config_from_dict({"quant_method": "rtn", "bits": 4}),
    ):
        with pytest.raises(AmbiguousBackendError, match="ambiguous"):
            call()
    (mine,) = problems_of("impostor")
    (theirs,) = problems_of("quantplug-rtn")
    assert mine.backend == theirs.backend == "rtn"
    assert "registers backend 'rtn', which quantplug-rtn (plugin rtn) also registers" in mine.problem
    assert "which impostor (registered at runtime) also registers: the name is ambiguous" in theirs.problem
    assert mine.fix == theirs.fix and "or uninstall the one you do not trust" in mine.fix
    # dropping the other claimant, as the fix says, gives rtn back to its plugin
    quantplug.unregister_plugin("impostor")
    assert quantplug.problems() == []
    assert quantplug.get_backend("rtn").quantizer == "quantplug_rtn.quantizer:RtnQuantizer"
    assert_rtn_still_works()


def test_three_claimants_stay_ambiguous_until_one_is_left(make_backend, plugin_registering):
    for name in ("one", "two"):
        quantplug.register_plugin(plugin_registering([make_backend("rtn", config=RtnConfig)]), name=name)
    with pytest.raises(AmbiguousBackendError, match="3 installed plugins register it"):
        quantplug.get_backend("rtn")
    assert len([p for p in quantplug.problems() if p.backend == "rtn"]) == 3
    quantplug.unregister_plugin("one")
    with pytest.raises(AmbiguousBackendError, match="2 installed plugins register it"):
        quantplug.get_backend("rtn")
    quantplug.unregister_plugin("rtn")  # the real one, this time
    assert quantplug.get_backend("rtn").plugin == "two"
    assert quantplug.problems() == []


def test_one_plugin_registering_a_name_twice_keeps_the_first(make_backend, plugin_registering):
    info = quantplug.register_plugin(
        plugin_registering([make_backend("twice-here"), make_backend("twice-here", quantizer="x:Other")]),
        name="twicer",
    )
    assert info.backends == ["twice-here"]
    (problem,) = problems_of("twicer")
    assert problem.problem == "registers backend name 'twice-here' twice; the second one is ignored"
    assert quantplug.get_backend("twice-here").quantizer != "x:Other"


def test_plugin_with_invalid_hook_signature_is_recorded(make_plugin):
    def register_backends(register, extra_argument):
        raise AssertionError("never called")

    info = quantplug.register_plugin(make_plugin(register_backends), name="badsig")
    assert info.status == "failed"
    (problem,) = problems_of("badsig")
    assert "invalid plugin" in problem.problem and "extra_argument" in problem.problem
    assert problem.fix


def test_registering_the_same_plugin_name_twice_is_recorded(make_backend, plugin_registering):
    quantplug.register_plugin(plugin_registering([make_backend("first-one")]), name="samename")
    info = quantplug.register_plugin(plugin_registering([make_backend("second-one")]), name="samename")
    assert info.status == "failed"
    (problem,) = problems_of("samename")
    assert "already registered" in problem.problem
    assert quantplug.get_backend("first-one").plugin == "samename"
    with pytest.raises(UnknownMethodError):
        quantplug.get_backend("second-one")


def test_many_broken_plugins_at_once_each_recorded(make_backend, make_plugin, plugin_registering):
    def raises(register):
        raise ValueError("x")

    quantplug.register_plugin(make_plugin(raises), name="p-raises")
    quantplug.register_plugin(plugin_registering([object()]), name="p-object")
    quantplug.register_plugin(plugin_registering([make_backend("bad name")]), name="p-desc")
    quantplug.register_plugin(plugin_registering([make_backend("rtn", config=RtnConfig)]), name="p-dup")
    by_plugin = {p.plugin: p for p in quantplug.problems()}
    assert set(by_plugin) == {"p-raises", "p-object", "p-desc", "p-dup", "quantplug-rtn"}
    assert by_plugin["quantplug-rtn"].backend == "rtn"  # the name p-dup made ambiguous
    assert all(p.fix for p in by_plugin.values())
    assert quantplug.backends() == []
    quantplug.unregister_plugin("p-dup")
    assert [b.name for b in quantplug.backends()] == ["rtn"]
    assert_rtn_still_works()


# -- requirements: listed but unavailable -----------------------------------------------------------


def test_backend_requiring_a_missing_distribution_is_listed_but_unavailable(make_backend):
    quantplug.register_backend(
        make_backend("needs-missing", requires=("quantplug-test-no-such-lib>=1.2,<2",))
    )
    backend = quantplug.get_backend("needs-missing")
    assert backend in quantplug.backends()
    assert not backend.available
    assert backend.status.reason == "quantplug-test-no-such-lib is not installed"
    assert backend.status.fix == "pip install 'quantplug-test-no-such-lib>=1.2,<2'"
    assert dict(backend.status.library_versions) == {"quantplug-test-no-such-lib": None}
    (problem,) = [p for p in quantplug.problems() if p.backend == "needs-missing"]
    assert problem.plugin == "inline:needs-missing"
    assert "not installed" in problem.problem and "pip install" in problem.fix

    with pytest.raises(BackendUnavailableError) as info:
        AutoQuantizer.from_config({"quant_method": "needs-missing"})
    msg = str(info.value)
    assert "'needs-missing' is unavailable" in msg
    assert "quantplug-test-no-such-lib is not installed" in msg
    assert "pip install 'quantplug-test-no-such-lib>=1.2,<2'" in msg
    # validating a config is still possible: only running needs the library
    assert quantplug.config_from_dict({"quant_method": "needs-missing", "bits": 8}).bits == 8


def test_backend_requiring_an_installed_library_outside_its_range_is_unavailable(make_backend):
    pluggy_version = version("pluggy")
    quantplug.register_backend(make_backend("needs-old-pluggy", requires=("pluggy<0.1",)))
    backend = quantplug.get_backend("needs-old-pluggy")
    assert not backend.available
    assert (
        backend.status.reason
        == f"pluggy {pluggy_version} is installed, but inline:needs-old-pluggy supports <0.1"
    )
    assert (
        "inline:needs-old-pluggy is incompatible with this quantplug: it needs pluggy<0.1"
        in backend.status.fix
    )
    assert "do not pip install pluggy<0.1, which would break quantplug" in backend.status.fix
    assert backend.status.library_versions["pluggy"] == pluggy_version
    with pytest.raises(BackendUnavailableError, match=r"it needs pluggy<0\.1"):
        AutoQuantizer.from_config({"quant_method": "needs-old-pluggy"})
    assert "needs-old-pluggy" in [p.backend for p in quantplug.problems()]


def test_backend_with_several_unmet_requirements_reports_all(make_backend):
    quantplug.register_backend(
        make_backend("needs-two", requires=("pluggy<0.1", "quantplug-test-no-such-lib"))
    )
    status = quantplug.get_backend("needs-two").status
    assert "pluggy" in status.reason and "quantplug-test-no-such-lib is not installed" in status.reason
    assert status.fix.startswith("inline:needs-two is incompatible with this quantplug: it needs pluggy<0.1")
    assert status.fix.endswith(" && pip install quantplug-test-no-such-lib")


def test_satisfied_and_marker_excluded_requirements_are_available(make_backend):
    quantplug.register_backend(
        make_backend("needs-ok", requires=("pluggy>=1", "quantplug-test-no-such-lib; python_version < '3'"))
    )
    backend = quantplug.get_backend("needs-ok")
    assert backend.available, backend.status
    assert backend.status.library_versions == {"pluggy": version("pluggy")}
    assert AutoQuantizer.from_config({"quant_method": "needs-ok"}).backend is backend


# -- lazy import of the quantizer -------------------------------------------------------------------


def test_quantizer_module_is_imported_only_on_first_use(make_backend):
    target = "quantplug_test_module_that_does_not_exist.quantizer:Q"
    quantplug.register_backend(make_backend("lazy-missing", quantizer=target))
    backend = quantplug.get_backend("lazy-missing")
    assert backend.available  # nothing was imported, so nothing failed yet
    assert quantplug.config_from_dict({"quant_method": "lazy-missing"}).bits == 4
    assert quantplug.problems() == []
    with pytest.raises(BackendUnavailableError) as info:
        AutoQuantizer.from_config({"quant_method": "lazy-missing"})
    msg = str(info.value)
    assert target in msg and "ModuleNotFoundError" in msg and "quantplug doctor" in msg
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert_rtn_still_works()


def test_quantizer_attribute_missing_or_not_a_quantizer(make_backend):
    quantplug.register_backend(make_backend("lazy-noattr", quantizer="quantplug:NoSuchQuantizer"))
    with pytest.raises(BackendUnavailableError, match="AttributeError"):
        AutoQuantizer.from_config({"quant_method": "lazy-noattr"})
    quantplug.register_backend(make_backend("lazy-notq", quantizer="collections:OrderedDict"))
    with pytest.raises(PluginError, match="not a quantplug.Quantizer subclass"):
        AutoQuantizer.from_config({"quant_method": "lazy-notq"})


def test_rtn_quantizer_module_is_imported_by_from_config():
    quantplug.backends()
    AutoQuantizer.from_config({"quant_method": "rtn", "bits": 4})
    assert "quantplug_rtn.quantizer" in sys.modules


# -- unknown methods and bad inputs to the dispatcher -----------------------------------------------


def test_known_plugin_method_not_installed_says_what_to_pip_install():
    if any(ep.name == "hqq" for ep in entry_points(group="quantplug")):
        pytest.skip("quantplug-hqq is installed here; this checks the error when it is not")
    with pytest.raises(UnknownMethodError) as info:
        AutoQuantizer.from_config({"quant_method": "hqq", "nbits": 4})
    msg = str(info.value)
    assert info.value.method == "hqq"
    hqq = Path(__file__).resolve().parents[1] / "plugins" / "hqq"
    assert f"provided by the plugin quantplug-hqq: pip install {hqq}" in msg  # a command that works here
    assert "installed backends: rtn" in msg
    with pytest.raises(UnknownMethodError, match="quantplug-hqq: pip install"):
        quantplug.get_backend("hqq")


def test_transformers_only_method_says_no_plugin_exists_yet():
    with pytest.raises(UnknownMethodError) as info:
        AutoQuantizer.from_config({"quant_method": "fp_quant", "bits": 4})
    msg = str(info.value)
    assert "'fp_quant'" in msg
    assert "no installed quantplug plugin provides it and quantplug knows of none that does" in msg
    assert "pip install" not in msg


def test_a_roster_method_names_its_plugin_folder():
    """Dashes in a distribution's name are underscores in its folder (plugins/gpu_formats)."""
    from quantplug.hints import install_command, install_hint

    assert "quantplug-gpu-formats" in install_hint("spqr")
    assert install_command("quantplug-gpu-formats").startswith("pip install ")
    assert (
        install_command("quantplug-gpu-formats")
        .rstrip(")")
        .endswith(("plugins/gpu_formats", "the package index yet"))
    )


def test_unknown_method_names_it_and_lists_installed_backends(make_backend):
    quantplug.register_backend(make_backend("extra-one"))
    with pytest.raises(UnknownMethodError) as info:
        AutoQuantizer.from_config({"quant_method": "no-such-method"})
    msg = str(info.value)
    assert "'no-such-method'" in msg
    assert "installed backends: extra-one, rtn" in msg
    assert "check the spelling" in msg
    assert isinstance(info.value, LookupError)
    assert not msg.startswith(("'", '"'))  # not quoted like a KeyError


def test_unknown_method_mentions_recorded_plugin_problems(make_plugin):
    def raises(register):
        raise RuntimeError("boom")

    quantplug.register_plugin(make_plugin(raises), name="broken")
    with pytest.raises(UnknownMethodError, match="1 plugin problem.*quantplug doctor"):
        quantplug.get_backend("no-such-method")


def test_missing_quant_method_key_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        AutoQuantizer.from_config({"bits": 4})
    err = info.value
    assert err.field == "quant_method"
    assert "no 'quant_method' key" in str(err)
    assert "rtn" in str(err)
    with pytest.raises(ConfigError):
        quantplug.config_from_dict({})


def test_non_dict_non_config_is_a_config_error():
    for bad in ("rtn", ["quant_method", "rtn"], None, 4):
        with pytest.raises(ConfigError):
            AutoQuantizer.from_config(bad)


def test_config_object_of_the_wrong_class_is_a_config_error():
    @dataclasses.dataclass(frozen=True)
    class FakeRtn(quantplug.QuantConfig):
        quant_method = "rtn"
        bits: int = 4

    with pytest.raises(ConfigError) as info:
        AutoQuantizer.from_config(FakeRtn())
    msg = str(info.value)
    assert "FakeRtn" in msg and "RtnConfig" in msg and "quantplug-rtn" in msg


def test_invalid_values_for_an_installed_backend_are_config_errors():
    with pytest.raises(ConfigError) as info:
        AutoQuantizer.from_config({"quant_method": "rtn", "bits": 3})
    assert info.value.field == "bits"
    with pytest.raises(ConfigError) as info:
        AutoQuantizer.from_config({"quant_method": "rtn", "nbits": 4})
    assert info.value.field == "nbits"


def test_config_object_dispatches_to_its_backend():
    q = AutoQuantizer.from_config(RtnConfig(bits=2, group_size=16))
    assert q.config == RtnConfig(bits=2, group_size=16)
    assert q.backend is quantplug.get_backend("rtn")


# -- environment variables --------------------------------------------------------------------------


def test_allow_list_set_but_empty_loads_no_plugins(monkeypatch):
    monkeypatch.setenv("QUANTPLUG_PLUGINS", "")
    quantplug.reload_plugins()
    assert quantplug.backends() == []
    statuses = [(p.name, p.status) for p in quantplug.plugins()]
    assert ("rtn", "disabled") in statuses and {status for _, status in statuses} == {"disabled"}
    assert quantplug.problems() == []
    with pytest.raises(UnknownMethodError) as info:
        quantplug.get_backend("rtn")
    msg = str(info.value)
    assert "Disabled by QUANTPLUG_PLUGINS" in msg and "rtn" in msg
    assert "installed but disabled by QUANTPLUG_PLUGINS: add rtn to QUANTPLUG_PLUGINS" in msg
    assert "pip install" not in msg


@pytest.mark.parametrize("value", ["rtn", "quantplug-rtn", "quantplug_rtn", " RTN , other"])
def test_allow_list_by_entry_point_or_distribution_name(monkeypatch, value):
    monkeypatch.setenv("QUANTPLUG_PLUGINS", value)
    quantplug.reload_plugins()
    assert [b.name for b in quantplug.backends()] == ["rtn"]


def test_allow_list_without_rtn_excludes_it(monkeypatch):
    monkeypatch.setenv("QUANTPLUG_PLUGINS", "some-other-plugin")
    quantplug.reload_plugins()
    assert quantplug.backends() == []


def test_env_vars_are_read_on_reload_not_at_each_call(monkeypatch):
    assert [b.name for b in quantplug.backends()] == ["rtn"]
    monkeypatch.setenv("QUANTPLUG_PLUGINS", "")
    assert [b.name for b in quantplug.backends()] == ["rtn"]
    quantplug.reload_plugins()
    assert quantplug.backends() == []


@pytest.mark.parametrize("value", ["rtn", "quantplug-rtn", "x,rtn"])
def test_deny_list_disables_and_the_error_says_so(monkeypatch, value):
    monkeypatch.setenv("QUANTPLUG_DISABLE_PLUGINS", value)
    quantplug.reload_plugins()
    assert "rtn" not in [b.name for b in quantplug.backends()]  # other installed plugins still load
    (info,) = [p for p in quantplug.plugins() if p.name == "rtn"]
    assert (info.name, info.status, info.error) == (
        "rtn",
        "disabled",
        "disabled by QUANTPLUG_DISABLE_PLUGINS",
    )
    with pytest.raises(UnknownMethodError) as err:
        AutoQuantizer.from_config({"quant_method": "rtn", "bits": 4})
    msg = str(err.value)
    assert re.search(r"Disabled by [^.]*\brtn\b", msg)
    assert "quantplug-rtn, which is installed but disabled by QUANTPLUG_DISABLE_PLUGINS" in msg
    assert "remove rtn from QUANTPLUG_DISABLE_PLUGINS" in msg
    assert "pip install" not in msg  # it is installed: installing it again would not help


def test_deny_list_wins_over_allow_list(monkeypatch):
    monkeypatch.setenv("QUANTPLUG_PLUGINS", "rtn")
    monkeypatch.setenv("QUANTPLUG_DISABLE_PLUGINS", "rtn")
    quantplug.reload_plugins()
    assert quantplug.backends() == []


def test_deny_list_of_other_names_keeps_rtn(monkeypatch):
    monkeypatch.setenv("QUANTPLUG_DISABLE_PLUGINS", "hqq,,bnb")
    quantplug.reload_plugins()
    assert [b.name for b in quantplug.backends()] == ["rtn"]


def test_a_disabled_plugin_name_can_still_be_registered_programmatically(
    monkeypatch, make_backend, plugin_registering
):
    monkeypatch.setenv("QUANTPLUG_DISABLE_PLUGINS", "rtn")
    quantplug.reload_plugins()
    info = quantplug.register_plugin(plugin_registering([make_backend("rtn", config=RtnConfig)]), name="rtn")
    assert info.status == "loaded"
    assert quantplug.get_backend("rtn").plugin == "rtn"


def test_trace_prints_plugin_loading_and_hook_calls(monkeypatch, capsys, make_backend, tmp_path):
    monkeypatch.setenv("QUANTPLUG_TRACE_PLUGINS", "1")
    monkeypatch.setenv("QUANTPLUG_CACHE_DIR", str(tmp_path))  # no descriptor cache yet: rtn is imported
    quantplug.reload_plugins()
    quantplug.backends()
    quantplug.register_backend(make_backend("traced"))
    err = capsys.readouterr().err
    assert f"quantplug: loading plugin 'rtn' (quantplug-rtn {RTN_VERSION}) from quantplug_rtn" in err
    assert "quantplug: rtn.register_backends(register) -> ['rtn']" in err
    assert "backend 'rtn' registered by quantplug-rtn" in err
    # register_backend registers the descriptor directly (no stand-in plugin, no hook call)
    assert "backend 'traced' registered by inline:traced" in err


def test_trace_reports_disabled_plugins_and_problems(monkeypatch, capsys, make_plugin):
    monkeypatch.setenv("QUANTPLUG_TRACE_PLUGINS", "1")
    monkeypatch.setenv("QUANTPLUG_DISABLE_PLUGINS", "rtn")
    quantplug.reload_plugins()
    quantplug.backends()

    def raises(register):
        raise RuntimeError("boom")

    quantplug.register_plugin(make_plugin(raises), name="tracebroken")
    err = capsys.readouterr().err
    assert "plugin 'rtn' disabled by QUANTPLUG_DISABLE_PLUGINS" in err
    assert "problem in tracebroken: register_backends raised RuntimeError: boom" in err


@pytest.mark.parametrize("value", [None, "", "0"])
def test_no_trace_output_unless_enabled(monkeypatch, capsys, value):
    if value is not None:
        monkeypatch.setenv("QUANTPLUG_TRACE_PLUGINS", value)
    quantplug.reload_plugins()
    quantplug.backends()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# -- threads ----------------------------------------------------------------------------------------


def _race_first_use(n_threads: int) -> list:
    """Reload, then let ``n_threads`` threads hit the registry at the same instant."""
    quantplug.reload_plugins()
    barrier = threading.Barrier(n_threads)
    results: list = [None] * n_threads
    errors: list = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            listed = quantplug.backends()
            rtn = quantplug.get_backend("rtn")
            dispatched = AutoQuantizer.from_config({"quant_method": "rtn"}).backend
            results[i] = (listed, rtn, quantplug.plugins(), dispatched)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return results


def test_concurrent_first_use_after_reload_gives_identical_results():
    for _ in range(5):
        results = _race_first_use(8)
        listed0, rtn0, plugins0, _ = results[0]
        assert [b.name for b in listed0] == ["rtn"]
        for listed, rtn, plugins, dispatched in results:
            # identical objects: one registry was built, not one per racing thread
            assert len(listed) == len(listed0)
            assert all(a is b for a, b in zip(listed, listed0, strict=True))
            assert rtn is rtn0 and dispatched is rtn0
            assert plugins == plugins0
        assert quantplug.problems() == []
