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
