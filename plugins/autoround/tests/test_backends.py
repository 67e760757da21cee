"""auto-round's inference backends on CPU: auto-round-lib's kernel by default (2/4/8 bits), its torch
backend when pinned (what a machine without auto-round-lib gets) and for 3 bits."""

from __future__ import annotations

import pytest
import torch

import quantplug
from quantplug.testing import tiny_llama, token_ids


@pytest.mark.parametrize(
    ("settings", "module_prefix"),
    [
        ({"bits": 4, "group_size": 64}, "auto_round_kernel."),
        ({"bits": 4, "group_size": 64, "backend": "torch"}, "auto_round_extension.torch."),
        ({"bits": 3, "group_size": 64}, "auto_round_extension.torch."),
    ],
    ids=["int4-auto", "int4-torch", "int3-auto"],
)
def test_backend_choice_and_round_trip(settings, module_prefix, tmp_path):
    model = tiny_llama()
    ids = token_ids(shape=(2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    config = {"quant_method": "auto-round", "iters": 2, **settings}
    quantplug.quantize(model, config, calibration_data=[token_ids(shape=(2, 16), seed=4)], progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__module__.startswith(module_prefix), type(layer)
    with torch.no_grad():
        out = model(ids).logits
    bound = quantplug.get_backend("auto-round").capabilities.max_rel_error[settings["bits"]]
    assert ((out - ref).norm() / ref.norm()).item() < 4 * bound
    loaded = quantplug.load(quantplug.save(model, tmp_path / "ckpt"), progress=False)
    assert type(loaded.model.layers[0].mlp.down_proj) is type(layer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
