"""``quantplug.export`` in the core: the integer-grid contract and the errors that need no target
plugin (the round trips into a real format are in plugins/compressed_tensors/tests/test_export_into_ct.py)."""

from __future__ import annotations

import pytest
import torch

import quantplug
from quantplug.testing import tiny_llama


def _grid(**overrides):
    codes = torch.tensor([[-8, 7, 0, 1], [3, -2, -1, 0]], dtype=torch.int8)
    fields = dict(
        codes=codes,
        scale=torch.tensor([[0.5, 0.25], [1.0, 2.0]]),
        zero_point=None,
        bits=4,
        group_size=2,
    )
    fields.update(overrides)
    return quantplug.IntegerGrid(**fields)


def test_grid_dequantizes_by_its_definition():
    grid = _grid(zero_point=torch.tensor([[1, 0], [0, -1]], dtype=torch.int8))
    expected = torch.tensor(
        [[(-8 - 1) * 0.5, (7 - 1) * 0.5, 0 * 0.25, 1 * 0.25], [3.0, -2.0, (-1 + 1) * 2.0, 2.0]]
    )
    assert torch.equal(grid.dequantize(), expected)
    assert grid.layout == quantplug.GridLayout(4, 2, False, 4, 2)
    assert _grid(group_size=4, scale=torch.ones(2, 1)).layout.per_channel


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"codes": torch.zeros(2, 4, dtype=torch.int32)}, "codes must be int8"),
        ({"bits": 9}, "outside 1..8"),
        ({"group_size": 0}, "must be positive"),
        ({"group_size": 3, "scale": torch.ones(2, 1)}, r"scale must be float \[2, 2\]"),  # 4 inputs: 3 + 1
        ({"scale": torch.ones(2, 3)}, r"scale must be float \[2, 2\]"),
        ({"scale": torch.ones(2, 2, dtype=torch.int32)}, "scale must be float"),
        ({"bits": 2}, "leave the 2-bit range -2..1"),
        ({"zero_point": torch.zeros(2, 1, dtype=torch.int8)}, r"zero_point must be \[2, 2\]"),
        ({"zero_point": torch.full((2, 2), 8, dtype=torch.int8)}, "zero_point values 8..8 leave"),
    ],
)
def test_grid_check_names_what_is_wrong(overrides, message):
    _grid().check("layer")  # the valid one passes
    with pytest.raises(quantplug.PluginError, match=message):
        _grid(**overrides).check("layer")


def test_rtn_symmetric_grid_is_the_layer(tmp_path):
    model = tiny_llama()
    quantplug.quantize(model, {"quant_method": "rtn", "bits": 4, "group_size": 32}, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    quantizer = quantplug.AutoQuantizer.from_config({"quant_method": "rtn", "bits": 4, "group_size": 32})
    grid = quantizer.integer_grid("model.layers.0.mlp.down_proj", layer)
    grid.check("down_proj")
    assert grid.zero_point is None and grid.bits == 4 and grid.group_size == 32
    assert torch.equal(grid.dequantize(), layer.dequantize())


def test_export_errors_without_a_target_plugin(tmp_path):
    model = tiny_llama()
    quantplug.quantize(model, {"quant_method": "rtn", "bits": 4, "group_size": 32}, progress=False)
    src = quantplug.save(model, tmp_path / "src")
    with pytest.raises(quantplug.ConfigError, match="'rtn' cannot be an export target"):
        quantplug.export(src, tmp_path / "out", format="rtn", progress=False)
    with pytest.raises(quantplug.UnknownMethodError):
        quantplug.export(src, tmp_path / "out", format="no-such-format", progress=False)
    assert not (tmp_path / "out").exists()
