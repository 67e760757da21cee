"""rtn's fused CPU kernels (``quantplug_rtn.fused``): the same weights as the portable layer, the
dense matmul from ``dense_from`` rows on, checkpoints unchanged, and a clear word when a layer
cannot run them."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import quantplug
from quantplug.testing import tiny_llama, token_ids
from quantplug_rtn import RtnConfig
from quantplug_rtn import fused as fused_mod
from quantplug_rtn.fused import FusedRtnLinear, kernel_problem, to_fused
from quantplug_rtn.quantizer import RtnLinear, RtnQuantizer

pytestmark = pytest.mark.skipif(
    kernel_problem() is not None, reason=f"no fused kernels here: {kernel_problem()}"
)

FUSABLE = [(8, -1), (4, 32), (4, 64), (4, 128), (4, 256)]
# (out, in): a multiple of 64 rows, rows the int4 kernel needs padded (100, 7), inputs the int8 kernel
# reads past unless padded (130: measured inf / a crash unpadded), a partial last group (130, 33)
SHAPES = [(192, 576), (100, 576), (64, 130), (7, 33)]


def _pair(bits: int, group: int, shape: tuple[int, int], dtype=torch.bfloat16, dense_from: int = 32):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0]).to(dtype)
    config = RtnConfig(bits=bits, group_size=group, dense_from=dense_from)
    portable = RtnLinear.from_linear(linear, config)
    return portable, to_fused(portable, config, "layer")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,group", FUSABLE)
def test_the_kernel_computes_the_portable_layers_weights(bits, group, shape):
    portable, fused = _pair(bits, group, shape)
    assert isinstance(fused, FusedRtnLinear)
    assert torch.equal(fused.dequantize(), portable.dequantize())
    weight = portable.dequantize().double()
    for rows in (1, 5):  # below dense_from: the kernel
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        exact = x.double() @ weight.T + portable.bias.double()
        got = fused(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, shape[0])
        # bfloat16 output: one rounding of the result (2**-8 relative) plus the bias add
        err = (got.double() - exact).abs().max() / exact.abs().max()
        assert err < 1.2e-2, err


@pytest.mark.parametrize("bits,group", FUSABLE)
def test_from_dense_from_rows_on_the_layer_runs_the_portable_dense_matmul_bitwise(bits, group):
    portable, fused = _pair(bits, group, (192, 576), dense_from=8)
    x = torch.randn(2, 4, 576, dtype=torch.bfloat16)  # 8 rows in a batch of 2: dense
    assert torch.equal(fused(x), portable(x))
    below = fused(x[:1])  # 4 rows: the kernel, same shape contract
    assert below.shape == (1, 4, 192)
    assert torch.allclose(below.float(), portable(x[:1]).float(), rtol=0.02, atol=0.02)


def test_a_model_gives_the_same_logits_on_both_sides_of_the_crossover():
    ids = token_ids(24)
    models = {}
    for name, dense_from in (("kernel", 10**6), ("dense", 1)):
        model = tiny_llama().to(torch.bfloat16)
        quantplug.quantize(model, RtnConfig(bits=4, group_size=32, dense_from=dense_from))
        assert sum(isinstance(m, FusedRtnLinear) for m in model.modules()) == 14
        models[name] = model
    portable = tiny_llama().to(torch.bfloat16)
    quantplug.quantize(portable, RtnConfig(bits=4, group_size=32, kernel="portable"))
    with torch.no_grad():
        kernel, dense, ref = (m(ids).logits.float() for m in (models["kernel"], models["dense"], portable))
    assert torch.equal(dense, ref)  # dense side: the portable layer's computation, bit for bit
    assert ((kernel - ref).norm() / ref.norm()).item() < 0.02  # kernel side: bf16 rounding apart


def test_checkpoints_are_rtns_packed_layout_and_load_fused(tmp_path):
    fused_model, portable_model = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    quantplug.quantize(fused_model, RtnConfig(bits=8, group_size=-1))
    quantplug.quantize(portable_model, RtnConfig(bits=8, group_size=-1, kernel="portable"))
    quantplug.save(fused_model, tmp_path / "fused")
    quantplug.save(portable_model, tmp_path / "portable")
    a, b = (
        load_file(tmp_path / "fused" / "model.safetensors"),
        load_file(tmp_path / "portable" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".qweight") for k in a) and not any("weight_int8" in k for k in a)
    loaded, portable = quantplug.load(tmp_path / "fused"), quantplug.load(tmp_path / "portable")
    layer = loaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, FusedRtnLinear) and layer.layout == "int8"
    assert isinstance(portable.model.layers[0].mlp.down_proj, RtnLinear)
    ids = token_ids(16)  # 24 rows: the kernel
    with torch.no_grad():
        got, ref = loaded(ids).logits.float(), portable(ids).logits.float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.02


def test_module_tensors_of_a_fused_layer_are_the_portable_layers_state_dict():
    for bits, group in FUSABLE:
        portable, fused = _pair(bits, group, (100, 130))
        quantizer = RtnQuantizer(quantplug.get_backend("rtn"), RtnConfig(bits=bits, group_size=group))
        stored = quantizer.module_tensors("layer", fused)
        expected = portable.state_dict()
        assert stored.keys() == expected.keys()
        assert all(torch.equal(stored[k], expected[k]) for k in stored), (bits, group)


def test_float32_activations_dequantize_and_say_so_once(monkeypatch):
    monkeypatch.setattr(fused_mod, "_warned", set())
    portable, fused = _pair(8, -1, (192, 576))  # a bfloat16 layer given float32 inputs
    x = torch.randn(1, 576)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fused(x)
        fused(x)
    assert torch.equal(
        out, torch.nn.functional.linear(x, portable.dequantize().float(), portable.bias.float())
    )
    said = [str(w.message) for w in caught if "float32 activations" in str(w.message)]
    assert len(said) == 1 and "bfloat16" in said[0]


def test_a_float32_model_keeps_the_portable_layers_and_says_so_once(monkeypatch):
    monkeypatch.setattr(fused_mod, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model = tiny_llama()
            quantplug.quantize(model, RtnConfig(bits=8, group_size=-1))
            assert not any(isinstance(m, FusedRtnLinear) for m in model.modules())
    said = [str(w.message) for w in caught if "a float32 model" in str(w.message)]
    assert len(said) == 1 and "torch.bfloat16" in said[0]
    with pytest.raises(quantplug.ConfigError, match="torch.float32"):
        quantplug.quantize(tiny_llama(), RtnConfig(bits=8, group_size=-1, kernel="fused"))


def test_without_the_instructions_auto_runs_portable_and_says_so_once(monkeypatch):
    monkeypatch.setattr(fused_mod, "_warned", set())
    monkeypatch.setattr(fused_mod, "kernel_problem", lambda: "torch reports CPU capability 'DEFAULT'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model = tiny_llama().to(torch.bfloat16)
            quantplug.quantize(model, RtnConfig(bits=8, group_size=-1))
            assert not any(isinstance(m, FusedRtnLinear) for m in model.modules())
            assert any(isinstance(m, RtnLinear) for m in model.modules())
    said = [str(w.message) for w in caught if "CPU capability" in str(w.message)]
    assert len(said) == 1 and "portable path" in said[0]
    with pytest.raises(quantplug.ConfigError, match="CPU capability 'DEFAULT'"):
        quantplug.quantize(tiny_llama().to(torch.bfloat16), RtnConfig(bits=8, group_size=-1, kernel="fused"))


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"bits": 4, "group_size": 32, "symmetric": False, "kernel": "fused"}, "asymmetric"),
        ({"bits": 4, "group_size": 16, "kernel": "fused"}, "group_size of 32, 64, 128, 256"),
        ({"bits": 2, "group_size": 32, "kernel": "fused"}, "no fused kernel"),
        ({"bits": 8, "group_size": -1, "kernel": "fast"}, "kernel"),
        ({"bits": 8, "group_size": -1, "dense_from": 0}, "dense_from"),
    ],
)
def test_settings_without_a_fused_kernel_are_refused_when_asked_for(fields, match):
    with pytest.raises(quantplug.ConfigError, match=match):
        RtnConfig(**fields)


def test_a_dtype_the_kernels_do_not_take_is_a_config_error_naming_it():
    model = tiny_llama().to(torch.float64)
    with pytest.raises(quantplug.ConfigError, match="torch.float64"):
        quantplug.quantize(model, RtnConfig(bits=8, group_size=-1, kernel="fused"))
    auto = tiny_llama().to(torch.float64)  # auto: the portable path, which takes any float dtype
    quantplug.quantize(auto, RtnConfig(bits=8, group_size=-1))
    assert any(isinstance(m, RtnLinear) for m in auto.modules())


def test_asymmetric_and_two_bit_layers_stay_portable():
    for config in (RtnConfig(bits=4, group_size=32, symmetric=False), RtnConfig(bits=2, group_size=32)):
        model = tiny_llama().to(torch.bfloat16)
        quantplug.quantize(model, config)
        assert not any(isinstance(m, FusedRtnLinear) for m in model.modules())


def test_the_dense_path_keeps_its_own_weight_when_autograd_needs_it():
    portable, fused = _pair(4, 32, (192, 576), dense_from=1)
    other = _pair(8, -1, (192, 576), dense_from=1)[1]  # dequantizes into the same scratch memory
    x = torch.randn(3, 576, dtype=torch.bfloat16, requires_grad=True)
    y = fused(x)
    other(torch.randn(3, 576, dtype=torch.bfloat16))  # would overwrite a shared weight
    y.float().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    portable(x_ref).float().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("bits,group", [(8, -1), (4, 128)])
def test_a_strided_input_runs_the_kernel(bits, group):
    portable, fused = _pair(bits, group, (128, 256))
    wide = torch.randn(3, 512, dtype=torch.bfloat16)
    x = wide[:, ::2]  # strided, as attention outputs can be (seen on MiniLM: "expect A to be contiguous")
    assert not x.is_contiguous()
    assert torch.equal(fused(x), fused(x.contiguous()))
    assert torch.allclose(fused(x).float(), portable(x).float(), rtol=0.02, atol=0.02)
