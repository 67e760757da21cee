"""auto-round's inference backends on CPU: its torch backend by default and for 3 bits, auto-round-lib's
kernel (2/4/8 bits) only when asked for by name (backend="ark": its outputs were wrong in
measured situations, README limits)."""

from __future__ import annotations

import pytest
import torch

import quantplug
from quantplug.testing import tiny_llama, token_ids


@pytest.mark.parametrize(
    ("settings", "module_prefix"),
    [
        ({"bits": 4, "group_size": 64}, "auto_round_extension.torch."),
        ({"bits": 4, "group_size": 64, "backend": "ark"}, "auto_round_kernel."),
        ({"bits": 4, "group_size": 64, "backend": "torch"}, "auto_round_extension.torch."),
        ({"bits": 3, "group_size": 64}, "auto_round_extension.torch."),
    ],
    ids=["int4-auto", "int4-ark", "int4-torch", "int3-auto"],
)
def test_backend_choice_and_round_trip(settings, module_prefix, tmp_path):
    model = tiny_llama()
    ids = token_ids(shape=(2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    config = {"quant_method": "auto-round", "iters": 2, **settings}
    quantplug.quantize(model, config, calibration_data=[token_ids(shape=(2, 16), seed=4)], progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert any(c.__module__.startswith(module_prefix) for c in type(layer).__mro__), type(layer)
    with torch.no_grad():
        out = model(ids).logits
    bound = quantplug.get_backend("auto-round").capabilities.max_rel_error[settings["bits"]]
    assert ((out - ref).norm() / ref.norm()).item() < 4 * bound
    loaded = quantplug.load(quantplug.save(model, tmp_path / "ckpt"), progress=False)
    assert type(loaded.model.layers[0].mlp.down_proj) is type(layer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)


def test_kernel_never_runs_single_threaded():
    """auto-round-lib 0.16.0's CPU kernel returns garbage (some rows inf) when torch runs one thread;
    the plugin runs its modules at two threads at least and gives the thread count back."""
    model = tiny_llama()
    ids = token_ids(shape=(2, 16))
    config = {
        "quant_method": "auto-round",
        "iters": 2,
        "bits": 4,
        "group_size": 64,
        "backend": "ark",
    }
    quantplug.quantize(model, config, calibration_data=[token_ids(shape=(2, 16), seed=4)], progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert any(c.__module__.startswith("auto_round_kernel.") for c in type(layer).__mro__), type(layer)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            two = model(ids).logits
        torch.set_num_threads(1)
        with torch.no_grad():
            one = model(ids).logits
        assert torch.get_num_threads() == 1  # given back
        x = torch.randn(8, layer.infeatures)
        with torch.no_grad():
            single = layer(x)
        torch.set_num_threads(2)
        with torch.no_grad():
            double = layer(x)
    finally:
        torch.set_num_threads(before)
    assert torch.isfinite(one).all()
    assert torch.equal(one, two)
    assert torch.equal(single, double)
