"""rtn layers on the core's kernels (``quantplug.kernels``: torch's fused int8 / int4 CPU kernels, as
``quantplug.KernelLinear``): the same weights as the portable ``RtnLinear``, the dense matmul from
``dense_from`` rows on, checkpoints in rtn's layout, and a clear word when a layer cannot run them."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import quantplug
from quantplug.testing import tiny_llama, token_ids
from quantplug_rtn import RtnConfig
from quantplug_rtn.quantizer import RtnLinear

KERNELS = {8: "torch-int8-cpu", 4: "torch-int4-cpu"}
_problems = [quantplug.available_kernels()[k].machine_problem() for k in KERNELS.values()]
pytestmark = pytest.mark.skipif(any(_problems), reason=f"no fused kernels here: {_problems}")

FUSABLE = [(8, -1), (4, 32), (4, 64), (4, 128), (4, 256)]
# (out, in): a multiple of 64 rows; rows the int4 kernel needs padded (100), with partial last groups of
# 128 / 256 (576 inputs); inputs the int8 kernel reads past unless padded (130: measured inf / a crash
# unpadded), and int4's partial last groups of 2 inputs
SHAPES = [(192, 576), (100, 576), (64, 130)]


def _pair(bits, group, shape, dtype=torch.bfloat16, dense_from=32):
    """(the portable RtnLinear, the same layer as quantize leaves it with kernel="auto")."""
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0]).to(dtype)
    layers = []
    for kernel in ("portable", "auto"):
        model = nn.Sequential(copy.deepcopy(linear))
        config = RtnConfig(bits=bits, group_size=group, dense_from=dense_from, kernel=kernel)
        quantplug.quantize(model, config, progress=False)
        layers.append((model[0], quantplug.kernel_choices(model)["0"]))
    (portable, _), (fast, choice) = layers
    assert isinstance(portable, RtnLinear)
    return portable, fast, choice


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,group", FUSABLE)
def test_the_kernel_computes_the_portable_layers_weights(bits, group, shape):
    portable, fast, choice = _pair(bits, group, shape)
    assert isinstance(fast, quantplug.KernelLinear) and choice == KERNELS[bits] == fast.kernel
    assert torch.equal(fast.weights.dequantize(torch.bfloat16), portable.dequantize())
    weight = portable.dequantize().double()
    for rows in (1, 5):  # below dense_from: the kernel
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        exact = x.double() @ weight.T + portable.bias.double()
        with torch.no_grad():
            got = fast(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, shape[0])
        # bfloat16 output: one rounding of the result (2**-8 relative) plus the bias add
        err = (got.double() - exact).abs().max() / exact.abs().max()
        assert err < 1.2e-2, err


@pytest.mark.parametrize("bits,group", FUSABLE)
def test_from_dense_from_rows_on_the_layer_runs_the_portable_dense_matmul_bitwise(bits, group):
    portable, fast, _ = _pair(bits, group, (192, 576), dense_from=8)
    assert fast.dense_from == 8
    x = torch.randn(2, 4, 576, dtype=torch.bfloat16)  # 8 rows in a batch of 2: dense
    with torch.no_grad():
        assert torch.equal(fast(x), portable(x))
        below = fast(x[:1])  # 4 rows: the kernel, same shape contract
    assert below.shape == (1, 4, 192)
    assert torch.allclose(below.float(), portable(x[:1]).float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("bits,group", [(8, -1), (4, 128)])
def test_without_dense_from_the_kernels_own_crossover_applies(bits, group):
    _, fast, _ = _pair(bits, group, (64, 256), dense_from=None)
    # the kernel's default is the crossover RtnConfig's docstring quotes (bench/results/fused_cpu.json)
    assert fast.dense_from == quantplug.available_kernels()[KERNELS[bits]].dense_from == {8: 32, 4: 96}[bits]


def test_a_model_gives_the_same_logits_on_both_sides_of_the_crossover():
    ids = token_ids(shape=(2, 12))
    models = {}
    for name, dense_from in (("kernel", 10**6), ("dense", 1)):
        model = tiny_llama().to(torch.bfloat16)
        quantplug.quantize(model, RtnConfig(bits=4, group_size=32, dense_from=dense_from), progress=False)
        assert sum(isinstance(m, quantplug.KernelLinear) for m in model.modules()) == 14
        models[name] = model
    portable = tiny_llama().to(torch.bfloat16)
    quantplug.quantize(portable, RtnConfig(bits=4, group_size=32, kernel="portable"), progress=False)
    assert set(quantplug.kernel_choices(portable).values()) == {"own forward: kernel='none'"}
    with torch.no_grad():
        kernel, dense, ref = (m(ids).logits.float() for m in (models["kernel"], models["dense"], portable))
    assert torch.equal(dense, ref)  # dense side: the portable layer's computation, bit for bit
    assert ((kernel - ref).norm() / ref.norm()).item() < 0.02  # kernel side: bf16 rounding apart


@pytest.mark.parametrize("bits,group,hidden", [(8, -1, 128), (4, 128, 192)])  # 192 inputs: partial groups
def test_checkpoints_are_rtns_packed_layout_and_load_onto_kernels(tmp_path, bits, group, hidden):
    def build():
        return tiny_llama(hidden_size=hidden).to(torch.bfloat16)

    fast, portable = build(), build()
    quantplug.quantize(fast, RtnConfig(bits=bits, group_size=group), progress=False)
    quantplug.quantize(portable, RtnConfig(bits=bits, group_size=group, kernel="portable"), progress=False)
    assert set(quantplug.kernel_choices(fast).values()) == {KERNELS[bits]}
    quantplug.save(fast, tmp_path / "fast")  # saved after the kernel swap: the layers are rebuilt
    quantplug.save(portable, tmp_path / "portable")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("fast", "portable"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".qweight") for k in a) and not any(k.endswith((".packed", ".weights")) for k in a)
    loaded = quantplug.load(tmp_path / "fast", progress=False)
    assert set(quantplug.kernel_choices(loaded).values()) == {KERNELS[bits]}
    assert isinstance(loaded.model.layers[0].mlp.down_proj, quantplug.KernelLinear)
    plain = quantplug.load(tmp_path / "portable", progress=False)  # its config says kernel="portable"
    assert isinstance(plain.model.layers[0].mlp.down_proj, RtnLinear)
    overridden = quantplug.load(tmp_path / "fast", progress=False, kernel="none")
    assert isinstance(overridden.model.layers[0].mlp.down_proj, RtnLinear)
    ids = token_ids(shape=(2, 8))  # 16 rows: the kernel
    with torch.no_grad():
        got, ref = loaded(ids).logits.float(), plain(ids).logits.float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.02


def test_a_float32_model_keeps_the_portable_layers_and_says_so_once(monkeypatch):
    # the core says it once per process and reason: forget earlier tests' warnings
    monkeypatch.setattr(importlib.import_module(quantplug.KernelLinear.__module__), "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model = tiny_llama()
            quantplug.quantize(model, RtnConfig(bits=8, group_size=-1), progress=False)
            assert not any(isinstance(m, quantplug.KernelLinear) for m in model.modules())
            assert sum(isinstance(m, RtnLinear) for m in model.modules()) == 14
            (why,) = set(quantplug.kernel_choices(model).values())
            assert why.startswith("own forward: no kernel takes it") and "the model is float32" in why
    said = [str(w.message) for w in caught if "no kernel takes it" in str(w.message)]
    assert len(said) == 1 and "the model is float32" in said[0] and "14 layer(s)" in said[0]
    with pytest.raises(quantplug.ConfigError, match="kernel='required' does not run layer .*float32"):
        quantplug.quantize(tiny_llama(), RtnConfig(bits=8, group_size=-1, kernel="fused"), progress=False)


def test_a_dtype_the_kernels_do_not_take_is_a_config_error_naming_it():
    with pytest.raises(quantplug.ConfigError, match="float64"):
        quantplug.quantize(
            tiny_llama().to(torch.float64), RtnConfig(bits=8, group_size=-1, kernel="fused"), progress=False
        )
    auto = tiny_llama().to(torch.float64)  # auto: the portable layers, which take any float dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantplug.quantize(auto, RtnConfig(bits=8, group_size=-1), progress=False)
    assert any(isinstance(m, RtnLinear) for m in auto.modules())


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"bits": 4, "group_size": 32, "symmetric": False, "kernel": "fused"}, "asymmetric"),
        ({"bits": 4, "group_size": 16, "kernel": "fused"}, "a multiple of 32"),
        ({"bits": 2, "group_size": 32, "kernel": "fused"}, "no fused kernel"),
        ({"bits": 8, "group_size": 128, "kernel": "fused"}, "int8 needs group_size=-1"),
        ({"bits": 8, "group_size": -1, "kernel": "fast"}, "kernel"),
        ({"bits": 8, "group_size": -1, "dense_from": 0}, "dense_from"),
    ],
)
def test_settings_without_a_fused_kernel_are_refused_when_asked_for(fields, match):
    with pytest.raises(quantplug.ConfigError, match=match):
        RtnConfig(**fields)


def test_asymmetric_and_two_bit_layers_stay_portable_and_say_why():
    for config, why in (
        (RtnConfig(bits=4, group_size=32, symmetric=False), "min/max layout"),
        (RtnConfig(bits=2, group_size=32), "2-bit codes"),
    ):
        model = tiny_llama().to(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantplug.quantize(model, config, progress=False)
        assert not any(isinstance(m, quantplug.KernelLinear) for m in model.modules())
        choices = set(quantplug.kernel_choices(model).values())
        assert len(choices) == 1 and why in choices.pop()


def test_the_dense_path_keeps_its_own_weight_when_autograd_needs_it():
    portable, fast, _ = _pair(4, 32, (192, 576), dense_from=1)
    other = _pair(8, -1, (192, 576), dense_from=1)[1]  # dequantizes into the same scratch memory
    assert isinstance(fast, quantplug.KernelLinear) and isinstance(other, quantplug.KernelLinear)
    x = torch.randn(3, 576, dtype=torch.bfloat16, requires_grad=True)
    y = fast(x)
    with torch.no_grad():
        other(torch.randn(3, 576, dtype=torch.bfloat16))  # would overwrite a shared weight
    y.float().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    portable(x_ref).float().sum().backward()
    assert x.grad is not None and torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("bits,group", [(8, -1), (4, 128)])
def test_a_strided_input_runs_the_kernel(bits, group):
    portable, fast, _ = _pair(bits, group, (128, 256))
    wide = torch.randn(3, 512, dtype=torch.bfloat16)
    x = wide[:, ::2]  # strided, as attention outputs can be (seen on MiniLM: "expect A to be contiguous")
    assert not x.is_contiguous()
    with torch.no_grad():
        assert torch.equal(fast(x), fast(x.contiguous()))
        assert torch.allclose(fast(x).float(), portable(x).float(), rtol=0.02, atol=0.02)
