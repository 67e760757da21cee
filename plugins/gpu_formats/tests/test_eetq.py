"""eetq: EETQ's int8 math (checked against an element-by-element transcription of EETQ's C++
``symmetric_quantize``), the layers on the core's int8 kernel, quantize-on-load, and the grid
round trip the kernels rely on."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from quantplug_gpu_formats.eetq import EetqLinear, quantize_weight
from torch import nn

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids

INT8_KERNEL = "torch-int8-cpu"
_problem = quantplug.available_kernels()[INT8_KERNEL].machine_problem()
needs_kernel = pytest.mark.skipif(_problem is not None, reason=f"no int8 kernel here: {_problem}")


def f32(x: float) -> float:
    """``x`` rounded to float32, as a C++ ``float`` holds it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def eetq_reference(weight: torch.Tensor) -> tuple[list[list[int]], list[float]]:
    """EETQ's ``symmetric_quantize`` (csrc/cutlass_kernels/cutlass_preprocessors.cc, INT8_WEIGHT_ONLY)
    on ``weight.T`` (Transformers passes [in, out]), one element at a time in float32; C's round
    (halves away from zero); C++'s min/max clamp, under which 0 / 0 (an all-zero column) gives 127."""
    w = weight.float().T.tolist()  # [in, out]: EETQ's rows are inputs, its columns output channels
    cols = len(w[0])
    per_col_max = [0.0] * cols
    for row in w:
        for j, v in enumerate(row):
            per_col_max[j] = max(per_col_max[j], abs(v))
    per_col_max = [f32(m * f32(1.0 / 128)) for m in per_col_max]
    codes = [[0] * len(w) for _ in range(cols)]  # back to [out, in]
    for i, row in enumerate(w):
        for j, v in enumerate(row):
            q = f32(v / per_col_max[j]) if per_col_max[j] else math.nan
            r = math.copysign(math.floor(abs(q) + 0.5), q) if not math.isnan(q) else q
            codes[j][i] = int(max(-128.0, min(127.0, r)) if not math.isnan(r) else 127)
    return codes, per_col_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codes_and_scales_are_eetqs(dtype):
    torch.manual_seed(0)
    w = (torch.randn(24, 40) * 0.05).to(dtype)
    w[3] = 0  # an all-zero output channel
    codes, scale = quantize_weight(w)
    ref_codes, ref_scale = eetq_reference(w)
    assert codes.tolist() == ref_codes
    assert scale.tolist() == ref_scale
    layer = EetqLinear.from_linear(_linear(w))
    assert layer.scales.dtype == dtype and torch.equal(layer.scales, scale.to(dtype))
    assert torch.equal(layer.dequantize()[3], torch.zeros(40, dtype=dtype))


def test_max_over_128_halves_away_from_zero_and_the_clamp():
    s = 2.0**-7  # exact quotients: the row's max is 128 * s, so its scale is s
    row = torch.tensor([128, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 3.25, -128]) * s
    codes, scale = quantize_weight(row.reshape(1, -1))
    assert scale.tolist() == [s]
    # torch.round would give 2, -2, 0, 0, 2, -2 for the halves; 128 clamps to 127, -128 stays
    assert codes.tolist() == [[127, 3, -3, 1, -1, 2, -2, 3, -128]]


def test_inf_or_nan_weights_are_refused_naming_the_layer():
    w = torch.randn(4, 8)
    w[2, 5] = math.inf
    with pytest.raises(quantplug.QuantplugError, match=r"'model.layers.0.mlp.up_proj'.*rows \[2\]"):
        quantize_weight(w, "model.layers.0.mlp.up_proj")


def _linear(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    layer.weight.data.copy_(w)
    return layer


def test_the_grid_round_trip_is_bit_for_bit():
    quantizer = quantplug.AutoQuantizer.from_config({"quant_method": "eetq"})
    torch.manual_seed(1)
    for bias in (True, False):
        layer = quantizer.quantize_module("l", nn.Linear(96, 48, bias=bias).to(torch.bfloat16))
        grid = quantizer.integer_grid("l", layer)
        assert grid.bits == 8 and grid.group_size == 96 and grid.zero_point is None
        grid.check("l")
        meta = nn.Linear(96, 48, bias=bias, device="meta", dtype=torch.bfloat16)
        rebuilt = quantizer.encode_grid("l", meta, grid)
        mine, again = quantizer.module_tensors("l", layer), quantizer.module_tensors("l", rebuilt)
        assert mine.keys() == again.keys() and all(
            mine[k].dtype == again[k].dtype and torch.equal(mine[k], again[k]) for k in mine
        )


def test_a_grid_eetq_cannot_hold_is_refused():
    quantizer = quantplug.AutoQuantizer.from_config({"quant_method": "eetq"})
    codes = torch.zeros(8, 64, dtype=torch.int8)
    grid = quantplug.IntegerGrid(codes, torch.ones(8, 2), None, 8, 32)  # groups of 32
    with pytest.raises(quantplug.PluginError, match="one scale per output channel"):
        quantizer.encode_grid("l", nn.Linear(64, 8, device="meta"), grid)


def _quantized(dtype=torch.bfloat16, kernel=None):
    model = tiny_llama().to(dtype)
    ids = token_ids()
    with torch.no_grad():
        ref = logits(model, ids).float()
    report = quantplug.quantize(model, {"quant_method": "eetq"}, progress=False, kernel=kernel)
    return model, ids, ref, report


@needs_kernel
def test_bfloat16_layers_run_the_int8_kernel_and_stay_close_to_the_float_model():
    model, ids, ref, report = _quantized()
    choices = quantplug.kernel_choices(model)
    assert set(report.converted) == set(choices) and "lm_head" not in choices
    assert set(choices.values()) == {INT8_KERNEL}, choices
    layer = model.get_submodule(report.converted[0])
    assert isinstance(layer, quantplug.KernelLinear) and layer.dtype == torch.bfloat16
    out = logits(model, ids).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert torch.isfinite(out).all() and rel < 0.03, rel


@needs_kernel
def test_the_kernel_holds_the_same_weights_as_eetqs_own_layer():
    portable, _, _, _ = _quantized(kernel="none")
    fast, ids, _, report = _quantized()
    for name in report.converted:
        mine, kernel = portable.get_submodule(name), fast.get_submodule(name)
        assert isinstance(mine, EetqLinear) and isinstance(kernel, quantplug.KernelLinear)
        assert torch.equal(kernel.weights.dequantize(torch.bfloat16), mine.dequantize())
    a, b = logits(portable, ids).float(), logits(fast, ids).float()
    assert ((a - b).norm() / a.norm()).item() < 0.01


def test_float32_layers_run_their_own_forward():
    model, ids, ref, report = _quantized(torch.float32)
    layer = model.get_submodule(report.converted[0])
    assert isinstance(layer, EetqLinear) and layer.scales.dtype == torch.float32
    x = torch.randn(3, layer.in_features)
    dense = x @ layer.dequantize().T + layer.bias if layer.bias is not None else x @ layer.dequantize().T
    assert torch.allclose(layer(x), dense)
    rel = ((logits(model, ids).float() - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel


@needs_kernel
def test_quantize_on_load_gives_the_model_quantize_gives(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    loaded = quantplug.load(
        tmp_path / "fp", config={"quant_method": "eetq"}, dtype=torch.bfloat16, progress=False
    )
    assert set(quantplug.kernel_choices(loaded).values()) == {INT8_KERNEL}
    plain = quantplug.load(tmp_path / "fp", dtype=torch.bfloat16, progress=False)
    quantplug.quantize(plain, {"quant_method": "eetq"}, progress=False)
    ids = token_ids()
    assert torch.equal(logits(loaded, ids), logits(plain, ids))


def test_saving_is_refused_and_writes_nothing(tmp_path):
    model, ids, _, _ = _quantized(torch.float32)
    before = logits(model, ids)
    with pytest.raises(
        quantplug.CheckpointError,
        match="'eetq' declares that its models cannot be saved .save is refused.*FasterTransformer",
    ):
        quantplug.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    assert torch.equal(logits(model, ids), before)  # the model is untouched
