"""Kernels apart from formats (``quantplug.kernels``): a third-party-style backend defined here
describes its layers as ``IntegerGrid``s (symmetric, integer or float zero points, act-order) and
rebuilds them (``encode_grid``); the core must run them on torch's fused CPU kernels, save exactly
what the backend would have, and refuse or fall back loudly where a kernel cannot be trusted."""

from __future__ import annotations

import dataclasses
import uuid
import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

import quantplug  # noqa: E402
from quantplug.testing_models import tiny_llama  # noqa: E402
from quantplug.torch_kernels import TorchInt4Cpu, TorchInt8Cpu  # noqa: E402

IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
pytestmark = pytest.mark.skipif(
    TorchInt4Cpu().machine_problem() is not None or TorchInt8Cpu().machine_problem() is not None,
    reason="torch's fused CPU kernels are not fast here",
)


class GridLinear(nn.Module):
    """codes int8 [out, in] (group order), scale [out, groups], zero (int8 / float / none), columns."""

    def __init__(self, grid: quantplug.IntegerGrid):
        super().__init__()
        self.bits, self.group_size = grid.bits, grid.group_size
        self.register_buffer("codes", grid.codes.clone())
        self.register_buffer("scale", grid.scale.clone())
        self.register_buffer("zero", None if grid.zero_point is None else grid.zero_point.clone())
        self.register_buffer("columns", None if grid.columns is None else grid.columns.clone())
        self.register_buffer("bias", None if grid.bias is None else grid.bias.clone())

    def grid(self) -> quantplug.IntegerGrid:
        return quantplug.IntegerGrid(
            self.codes, self.scale, self.zero, self.bits, self.group_size, self.bias, self.columns
        )

    def forward(self, x):
        w = self.grid().dequantize().float().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def _grid(w: torch.Tensor, bias, c) -> quantplug.IntegerGrid:
    out_f, in_f = w.shape
    group = in_f if c.group_size == -1 else c.group_size
    columns = torch.randperm(in_f, generator=torch.Generator().manual_seed(in_f)) if c.act_order else None
    whole = -(-in_f // group) * group  # a partial last group: padded with zeros to quantize
    wg = F.pad((w if columns is None else w[:, columns]).float(), (0, whole - in_f)).reshape(out_f, -1, group)
    lo, hi = -(1 << (c.bits - 1)), (1 << (c.bits - 1)) - 1
    if c.zero == "none":
        scale = (wg.abs().amax(-1) / hi).clamp_min(1e-8)
        zero = None
        codes = torch.round(wg / scale.unsqueeze(-1)).clamp(lo, hi)
    else:
        mn, mx = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((mx - mn) / (hi - lo)).clamp_min(1e-8)
        zero = -mn / scale + lo  # (c - zero) * scale: c = lo at the minimum
        zero = torch.round(zero).clamp(lo, hi).to(torch.int8) if c.zero == "int" else zero.to(w.dtype)
        codes = torch.round(wg / scale.unsqueeze(-1) + zero.float().unsqueeze(-1)).clamp(lo, hi)
    codes = codes.reshape(out_f, whole)[:, :in_f].to(torch.int8)
    b = None if bias is None else bias.detach().clone()
    return quantplug.IntegerGrid(codes, scale.to(w.dtype), zero, c.bits, group, b, columns)


class GridQuantizer(quantplug.Quantizer):
    def quantize_module(self, name, module):
        return GridLinear(_grid(module.weight.detach(), module.bias, self.config))

    def empty_module(self, name, module):
        with torch.device("meta"):
            w = torch.zeros(module.out_features, module.in_features, dtype=module.weight.dtype)
            return GridLinear(_grid(w, module.bias, self.config))

    def load_module(self, name, module, tensors):
        q = self.empty_module(name, module)
        q.load_state_dict(tensors, strict=True, assign=True)
        return q

    def integer_grid(self, name, qmodule):
        return qmodule.grid()

    def encode_grid(self, name, module, grid):
        q = GridLinear(grid)
        if self.config.lossy_encode:  # a backend whose rebuild is not exact
            q.scale = q.scale.to(torch.float16).to(q.scale.dtype) + 1e-3
        return q


def make_backend() -> str:
    name = f"grid{uuid.uuid4().hex[:8]}"

    @dataclasses.dataclass(frozen=True)
    class GridConfig(quantplug.QuantConfig):
        quant_method = name
        bits: int = 4
        group_size: int = 32
        zero: str = "none"  # "none" (symmetric), "int", "float"
        act_order: bool = False
        lossy_encode: bool = False

    quantplug.register_backend(
        quantplug.Backend(
            name=name,
            config=GridConfig,
            quantizer=f"{__name__}:GridQuantizer",
            capabilities=quantplug.Capabilities(bits=(2, 3, 4, 8)),
            description="test integer-grid backend",
        )
    )
    return name


def _pair(config: dict, dtype=torch.bfloat16):
    """(the model on kernels, the same model on the backend's own forward)."""
    models = []
    for kernel in ("auto", "none"):
        model = tiny_llama().to(dtype)
        quantplug.quantize(model, config, progress=False, kernel=kernel)
        models.append(model)
    return models


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


CASES = {
    "int4-g32-sym": ({"bits": 4, "group_size": 32}, "torch-int4-cpu"),
    "int4-g128-int-zero": ({"bits": 4, "group_size": 128, "zero": "int"}, "torch-int4-cpu"),
    "int4-g64-float-zero": ({"bits": 4, "group_size": 64, "zero": "float"}, "torch-int4-cpu"),
    "int4-g32-act-order": ({"bits": 4, "group_size": 32, "zero": "int", "act_order": True}, "torch-int4-cpu"),
    "int4-per-channel": ({"bits": 4, "group_size": -1}, "torch-int4-cpu"),
    "int4-g96-partial-last-group": ({"bits": 4, "group_size": 96, "zero": "int"}, "torch-int4-cpu"),
    "int8-per-channel": ({"bits": 8, "group_size": -1}, "torch-int8-cpu"),
    "int8-per-channel-zero": ({"bits": 8, "group_size": -1, "zero": "int"}, "torch-int8-cpu"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_grid_shape_runs_its_kernel_with_the_backends_answer(case, tmp_path):
    fields, kernel = CASES[case]
    config = {"quant_method": make_backend(), **fields}
    fast, own = _pair(config)
    assert set(quantplug.kernel_choices(fast).values()) == {kernel}
    assert all(
        isinstance(fast.get_submodule(n), quantplug.KernelLinear) for n in quantplug.kernel_choices(fast)
    )
    assert not any(isinstance(m, quantplug.KernelLinear) for m in own.modules())
    with torch.no_grad():
        for ids in (IDS, IDS[:, :1]):  # 12 rows: the kernel; 1 row: the kernel (decode)
            assert _rel(fast(ids).logits, own(ids).logits) < 2e-2
    # the checkpoint is the backend's, bit for bit, whatever ran the layers
    quantplug.save(fast, tmp_path / "fast")
    quantplug.save(own, tmp_path / "own")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("fast", "own"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = quantplug.load(tmp_path / "fast", progress=False)
    assert set(quantplug.kernel_choices(loaded).values()) == {kernel}
    with torch.no_grad():  # (a loaded model computes its rotary buffers in float32: not bitwise)
        assert _rel(loaded(IDS).logits, fast(IDS).logits) < 2e-2


def test_a_grid_no_kernel_takes_runs_the_backends_forward_and_says_so_once():
    config = {"quant_method": make_backend(), "bits": 3, "group_size": 32}
    with pytest.warns(UserWarning, match=r"no kernel takes it .*3-bit codes"):
        model = tiny_llama().to(torch.bfloat16)
        quantplug.quantize(model, config, progress=False)
    assert all(
        v.startswith("own forward: no kernel takes it") for v in quantplug.kernel_choices(model).values()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not on every load
        quantplug.quantize(tiny_llama().to(torch.bfloat16), config, progress=False)
    with pytest.raises(quantplug.ConfigError, match=r"kernel='required' does not run layer .*3-bit"):
        quantplug.quantize(tiny_llama().to(torch.bfloat16), config, progress=False, kernel="required")
    with pytest.raises(quantplug.ConfigError, match=r"unknown kernel 'marlin'"):
        quantplug.quantize(tiny_llama().to(torch.bfloat16), config, progress=False, kernel="marlin")


def test_a_float32_model_keeps_the_backends_forward_and_names_the_dtype():
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantplug.quantize(model, {"quant_method": make_backend()}, progress=False)
    (why,) = set(report.kernels.values())
    assert "float32" in why and why.startswith("own forward")
    assert "own forward" in str(report)


def test_a_backend_that_cannot_rebuild_its_tensors_exactly_keeps_its_module():
    model = tiny_llama().to(torch.bfloat16)
    quantplug.quantize(model, {"quant_method": make_backend(), "lossy_encode": True}, progress=False)
    choices = set(quantplug.kernel_choices(model).values())
    assert len(choices) == 1 and "cannot rebuild its checkpoint tensors" in choices.pop()
    assert not any(isinstance(m, quantplug.KernelLinear) for m in model.modules())


class WrongInt4(TorchInt4Cpu):
    name, priority = "wrong-int4", 100

    def build(self, grid, dtype):
        weights = super().build(grid, dtype)
        weights.matmul = lambda x: torch.zeros(x.shape[0], weights.out_features, dtype=x.dtype)
        return weights


class OtherInt4(TorchInt4Cpu):
    name, priority = "other-int4", 50


def test_a_kernel_that_disagrees_with_the_backend_is_disabled_with_a_warning_naming_it():
    quantplug.register_kernel(WrongInt4())
    try:
        model = tiny_llama().to(torch.bfloat16)
        with pytest.warns(
            UserWarning,
            match=r"'wrong-int4' kernel disabled for 14 layer\(s\) \('model\.layers\.0.*differs from the backend",
        ):
            quantplug.quantize(model, {"quant_method": make_backend()}, progress=False)
    finally:
        quantplug.unregister_kernel("wrong-int4")
    assert all("wrong-int4 failed the check" in v for v in quantplug.kernel_choices(model).values())


def test_a_registered_kernel_of_higher_priority_runs_the_layers():
    quantplug.register_kernel(OtherInt4())
    try:
        assert "other-int4" in quantplug.available_kernels()
        model = tiny_llama().to(torch.bfloat16)
        quantplug.quantize(model, {"quant_method": make_backend()}, progress=False)
    finally:
        quantplug.unregister_kernel("other-int4")
    assert set(quantplug.kernel_choices(model).values()) == {"other-int4"}
    with pytest.raises(quantplug.PluginError, match="Kernel instance"):
        quantplug.register_kernel(object())


def test_gradients_flow_through_a_kernel_layer_to_its_input():
    fast, own = _pair({"quant_method": make_backend(), "zero": "int", "act_order": True})
    name = next(iter(quantplug.kernel_choices(fast)))
    grads = []
    x0 = torch.randn(3, fast.get_submodule(name).in_features, dtype=torch.bfloat16)
    for model in (fast, own):
        x = x0.clone().requires_grad_(True)
        model.get_submodule(name)(x).float().square().sum().backward()
        grads.append(x.grad)
    assert grads[0] is not None and _rel(grads[0], grads[1]) < 2e-2


def test_a_strided_input_and_the_dense_path_give_the_backends_answer():
    fast, own = _pair({"quant_method": make_backend(), "bits": 8, "group_size": -1, "zero": "int"})
    name = "model.layers.0.mlp.down_proj"
    layer, ref = fast.get_submodule(name), own.get_submodule(name)
    x = torch.randn(256, 40, dtype=torch.bfloat16).T  # [40, 256], strided
    assert not x.is_contiguous()
    with torch.no_grad():
        assert _rel(layer(x[:2]), ref(x[:2])) < 2e-2  # kernel
        assert _rel(layer(x), ref(x)) < 2e-2  # 40 rows: dense_from (32) on, the dequantized matmul


def test_grids_that_do_not_hold_together_are_refused():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    scale = torch.ones(4, 1)
    bad_columns = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(quantplug.PluginError, match="not a permutation"):
        quantplug.IntegerGrid(codes, scale, None, 4, 8, columns=bad_columns).check("x")
    with pytest.raises(quantplug.PluginError, match=r"scale must be float \[4, 2\]"):  # 8 inputs, groups of 5
        quantplug.IntegerGrid(codes, scale, None, 4, 5).check("x")
    with pytest.raises(quantplug.PluginError, match=r"zero_point must be \[4, 1\]"):
        quantplug.IntegerGrid(codes, scale, torch.zeros(4, 2), 4, 8).check("x")
    # float32 zero points beside bfloat16 scales (HQQ's, held exactly): the weight is computed in float32
    zero = torch.full((4, 1), 0.3)
    grid = quantplug.IntegerGrid(codes, scale.bfloat16(), zero, 4, 8, columns=torch.arange(8).flip(0))
    grid.check("x")
    assert torch.equal(grid.dequantize(), torch.full((4, 8), -0.3).bfloat16())
    assert grid.layout.act_order and grid.layout.float_zero and "act-order" in grid.layout.format_problem
    partial = quantplug.IntegerGrid(codes, torch.ones(4, 2), None, 4, 5)  # a partial last group of 3
    partial.check("x")
    assert "last group is partial" in partial.layout.format_problem


@pytest.mark.parametrize(
    "fields",
    [
        {"bits": 4, "group_size": 32, "zero": "int", "act_order": True},
        {"bits": 8, "group_size": -1, "zero": "int"},
    ],
)
def test_a_kernel_layer_compiles_without_a_graph_break(fields):
    fast, _ = _pair({"quant_method": make_backend(), **fields})
    layer = fast.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(1, layer.in_features, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)  # a graph break would raise
    with torch.no_grad():
        assert _rel(compiled(x), layer(x)) < 1e-2
