"""Messages that must say what is wrong and what to do, not send the user the wrong way (issue 18):
a misspelt quant_method, fix hints that would break quantplug, config errors, stale temp folders."""

from __future__ import annotations

import pytest
import torch

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
        "RtnConfig: unknown key(s) 'bit'; allowed keys: bits, dense_from, group_size, kernel, modules_to_not_convert, "
        "symmetric "
        "(pass them by name)."
    )
    assert (info.value.field, info.value.value) == ("bit", 4)


def test_a_transformers_method_without_a_plugin_is_described_neutrally(rtn_only):
    with pytest.raises(UnknownMethodError) as info:
        quantplug.get_backend("fp_quant")
    msg = str(info.value)
    assert (
        "quant_method 'fp_quant' is a method Transformers implements; no installed quantplug plugin provides it "
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


# -- a bitsandbytes 4-bit checkpoint saved after bitsandbytes repacked it for its CPU kernel ------


def _avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def _assert_repack_message(exc: Exception) -> None:
    msg = str(exc)
    assert isinstance(exc, quantplug.CheckpointError), msg
    assert "weight.absmax is a [" in msg and "bfloat16 tensor" in msg
    assert "saved after a forward pass on a CPU with AVX512-BF16" in msg
    assert "quantize the full-precision model again" in msg


def test_an_nf4_checkpoint_with_cpu_repacked_scales_says_why(tmp_path):
    """bitsandbytes 0.50 repacks 4-bit layers on the first eval forward on AVX512-BF16 CPUs and its
    state_dict() then writes transposed bfloat16 scales. Rewritten here the way it writes them, so
    the test runs on any CPU; the real path is below."""
    pytest.importorskip("quantplug_bnb", reason="quantplug-bnb is not installed in this env")
    from safetensors.torch import load_file, save_file

    from quantplug.testing import tiny_llama

    model = tiny_llama()
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    quantplug.quantize(model, nf4, progress=False)
    quantplug.save(model, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    for key in [k for k in tensors if k.endswith(".weight.absmax")]:
        layer = model.get_submodule(key.removesuffix(".weight.absmax"))
        by_row = tensors[key].reshape(layer.out_features, layer.in_features // 64)  # blocks of 64
        tensors[key] = by_row.t().contiguous().to(torch.bfloat16)  # the codes give nothing away
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(quantplug.CheckpointError) as info:
        quantplug.load(tmp_path, progress=False)
    _assert_repack_message(info.value)


@pytest.mark.skipif(not _avx512_bf16(), reason="bitsandbytes repacks only on CPUs with AVX512-BF16")
def test_a_transformers_saved_nf4_checkpoint_repacked_by_a_forward_says_why(tmp_path):
    pytest.importorskip("quantplug_bnb", reason="quantplug-bnb is not installed in this env")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quantplug.testing import tiny_llama, token_ids

    tiny_llama().save_pretrained(tmp_path / "fp")
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    with torch.no_grad():
        model(token_ids())
    model.save_pretrained(tmp_path / "nf4")
    with pytest.raises(quantplug.CheckpointError) as info:
        quantplug.load(tmp_path / "nf4", progress=False)
    _assert_repack_message(info.value)


# -- compare: what a library warns on import is its own, not the first candidate's -----------------

NOISY_MODULE = """
import logging
from torch import nn
import quantplug

logging.getLogger("{name}.kernels").warning("optional 4-bit kernel not found; using the slow path")


class Half(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().half())
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


class NoisyQuantizer(quantplug.Quantizer):
    def quantize_module(self, name, module):
        return Half(module)

    empty_module = quantize_module
"""


def test_compare_reports_a_library_import_warning_as_the_librarys(rtn_only, tmp_path, monkeypatch):
    import dataclasses
    import uuid

    from quantplug.comparison import compare, to_markdown
    from quantplug.testing import tiny_llama

    module = f"tp_noisy_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(NOISY_MODULE.replace("{name}", module))
    monkeypatch.syspath_prepend(str(tmp_path))

    @dataclasses.dataclass(frozen=True)
    class NoisyConfig(quantplug.QuantConfig):
        quant_method = "tp-noisy"
        bits: int = 16

    quantplug.register_backend(
        quantplug.Backend(
            name="tp-noisy",
            config=NoisyConfig,
            quantizer=f"{module}:NoisyQuantizer",
            capabilities=quantplug.Capabilities(bits=(16,), devices=("cpu",)),
            presets=(quantplug.Preset("fp16", {"bits": 16}, bits=16, bits_per_weight=16),),
        )
    )
    small = {"tokens": 96, "window": 32, "decode_tokens": 2, "repeats": 1}
    result = compare(tiny_llama(), ["tp-noisy:fp16", "rtn:int8"], **small)
    noisy = f"{module}.kernels: optional 4-bit kernel not found; using the slow path"
    assert result.import_warnings == {"tp-noisy": [noisy]}
    assert all(noisy not in row.warnings for row in result.rows)
    assert result.to_dict()["import_warnings"] == {"tp-noisy": [noisy]}
    md = to_markdown(result)
    assert f"- Warnings of backend libraries on import (not tied to a candidate): tp-noisy: {noisy}" in md
