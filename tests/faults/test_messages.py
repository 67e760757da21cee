"""Messages that must say what is wrong and what to do, not send the user the wrong way (issue 18):
a misspelt quant_method, fix hints that would break quantplug, config errors, stale temp folders."""

from __future__ import annotations

import pytest

import quantplug
from quantplug import UnknownMethodError


@pytest.mark.parametrize("spelling", ["RTN", "Rtn", " rtn "])
def test_wrong_case_of_an_installed_method_says_did_you_mean_and_not_install(rtn_only, spelling):
    with pytest.raises(UnknownMethodError) as info:
        quantplug.get_backend(spelling)
    msg = str(info.value)
    assert "Did you mean 'rtn'? quant_method is matched exactly" in msg
    assert "pip install" not in msg and "provided by the plugin" not in msg


def test_underscore_for_dash_of_a_registered_method_says_did_you_mean(make_backend):
    quantplug.register_backend(make_backend("my-method"))
    with pytest.raises(
        UnknownMethodError, match=r"Did you mean 'my-method'\? quant_method is matched exactly"
    ):
        quantplug.get_backend("my_method")


# -- fix hints for unmet library requirements -------------------------------------------------------


def _status(make_backend, *requires: str):
    quantplug.register_backend(make_backend("needs-lib", requires=requires))
    return quantplug.get_backend("needs-lib").status


def test_fix_prints_the_range_lower_bound_first(make_backend):
    status = _status(make_backend, "quantplug-test-no-such-lib<2,>=1.2")
    assert status.fix == "pip install 'quantplug-test-no-such-lib>=1.2,<2'"


def test_fix_never_suggests_a_version_quantplug_itself_excludes(make_backend):
    from importlib.metadata import version

    installed = version("safetensors")
    status = _status(make_backend, "safetensors>=0.1,<0.2")  # quantplug requires safetensors>=0.4
    assert status.reason == f"safetensors {installed} is installed, but inline:needs-lib supports >=0.1,<0.2"
    assert "pip install 'safetensors" not in status.fix
    assert status.fix.startswith(
        "inline:needs-lib is incompatible with this quantplug: it needs safetensors>=0.1,<0.2, but quantplug "
    )
    assert (
        "requires safetensors>=0.4. Upgrade inline:needs-lib to a release that supports safetensors>=0.4"
        in (status.fix)
    )
    with pytest.raises(quantplug.BackendUnavailableError, match="is incompatible with this quantplug"):
        quantplug.get_backend("needs-lib").ensure_available()


def test_fix_within_both_ranges_carries_quantplugs_lower_bound(make_backend):
    status = _status(make_backend, "safetensors>=0.1,<0.5")
    if status.available:
        pytest.skip("the installed safetensors is in the plugin's range")
    assert status.fix == "pip install 'safetensors>=0.1,>=0.4,<0.5'"


def test_an_extra_of_quantplug_is_named_as_such(make_backend):
    status = _status(make_backend, "transformers<4")
    assert "but quantplug[transformers] " in status.fix and "requires transformers>=5.0" in status.fix


# -- config messages ---------------------------------------------------------------------------------


def test_a_string_skip_list_says_give_a_list_of_module_names():
    from quantplug_rtn import RtnConfig

    with pytest.raises(quantplug.ConfigError) as info:
        RtnConfig(modules_to_not_convert="lm_head")
    assert str(info.value) == (
        "RtnConfig: modules_to_not_convert='lm_head' is invalid (a single string; give a list: ['lm_head']); "
        "allowed: a list of strings (module names), or null."
    )
    assert info.value.allowed == "a list of strings (module names), or null"


def test_an_unknown_keyword_raises_config_error_as_the_readme_promises():
    from quantplug_rtn import RtnConfig

    with pytest.raises(quantplug.ConfigError) as info:
        RtnConfig(bit=4)
    assert str(info.value) == (
        "RtnConfig: unknown key(s) 'bit'; allowed keys: bits, group_size, modules_to_not_convert, symmetric "
        "(pass them by name)."
    )
    assert (info.value.field, info.value.value) == ("bit", 4)


def test_a_transformers_method_without_a_plugin_is_described_neutrally(rtn_only):
    with pytest.raises(UnknownMethodError) as info:
        quantplug.get_backend("gptq")
    msg = str(info.value)
    assert (
        "quant_method 'gptq' is a method Transformers implements; no installed quantplug plugin provides it "
        "and quantplug knows of none that does: load the model with transformers directly"
    ) in msg
    assert "exists" not in msg and "pip install" not in msg


# -- the conformance kit ------------------------------------------------------------------------------


def test_kit_import_lightness_failure_names_the_heavy_modules(rtn_only):
    from quantplug.testing import BackendConformance

    class Kit(BackendConformance):
        backend_name = "rtn"
        library_modules = ("json",)  # the check's own script imports json: a stand-in for a heavy library

    with pytest.raises(AssertionError) as info:
        Kit().test_listing_and_config_validation_import_nothing_heavy(({"bits": 4}, 4))
    msg = str(info.value)
    assert "listing backends and validating a 'rtn' config imported heavy module(s): json (" in msg
    assert "Fix: import them only in the quantizer's module (quantplug_rtn." in msg
