"""The native experts path (``quantplug.experts_contract``), through a third-party-style backend
defined here: int8 per output channel for Linear layers, and stacked experts quantized whole
(one int8 3-D tensor per projection, ``Capabilities(native_experts=True)``, ``quantize_experts`` /
``empty_experts`` and nothing else). The core must leave its experts stacked and send them through
quantize, save, pre-quantized load, quantize-on-load and the Transformers bridge."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import quantplug  # noqa: E402
from quantplug.experts import ExpertsLayout, UnfusedExperts, experts_sites  # noqa: E402
from quantplug.integrations.transformers import register_with_transformers  # noqa: E402
from quantplug.testing_models import tiny_moe  # noqa: E402

IDS = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))


def _int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and scales per row of the last two dims (per expert, per output channel)."""
    scale = (w.float().abs().amax(dim=-1) / 127).clamp_min(1e-12)
    return torch.round(w.float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale.to(w.dtype)


class Int8Linear(nn.Module):
    def __init__(self, in_f: int, out_f: int, dtype, device="meta"):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_f, in_f, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_f, dtype=dtype, device=device))

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype).unsqueeze(1))


class Int8Experts(nn.Module):
    """Qwen3-MoE / Mixtral layout kept stacked: ``gate_up`` [E, 2I, H] and ``down`` [E, H, I] int8."""

    def __init__(self, layout: ExpertsLayout, act_fn: nn.Module, dtype, device="meta"):
        super().__init__()
        e, h, i = layout.num_experts, layout.hidden, layout.intermediate
        self.num_experts, self.act_fn = e, act_fn
        for name, shape in (("gate_up", (e, 2 * i, h)), ("down", (e, h, i))):
            self.register_buffer(name, torch.empty(shape, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scale", torch.empty(shape[:2], dtype=dtype, device=device))
        self.calls = 0

    def _w(self, name: str, e: int, dtype) -> torch.Tensor:
        return getattr(self, name)[e].to(dtype) * getattr(self, f"{name}_scale")[e].to(dtype).unsqueeze(1)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        self.calls += 1
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token_idx, k_pos = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            gate, up = F.linear(x, self._w("gate_up", e, x.dtype)).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self._w("down", e, x.dtype))
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out


class NativeQuantizer(quantplug.Quantizer):
    def quantize_module(self, name, module):
        q = Int8Linear(module.in_features, module.out_features, module.weight.dtype, module.weight.device)
        q.weight, q.scale = _int8(module.weight.detach())
        return q

    def empty_module(self, name, module):
        return Int8Linear(module.in_features, module.out_features, module.weight.dtype)

    def quantize_experts(self, name, module, layout):
        assert not layout.is_transposed and layout.is_concatenated and not layout.has_bias
        q = Int8Experts(layout, module.act_fn, module.down_proj.dtype, module.down_proj.device)
        q.gate_up, q.gate_up_scale = _int8(module.gate_up_proj.detach())
        q.down, q.down_scale = _int8(module.down_proj.detach())
        return q

    def empty_experts(self, name, module, layout):
        return Int8Experts(layout, module.act_fn, module.down_proj.dtype)


def make_backend() -> str:
    name = f"tp-native-{uuid.uuid4().hex[:8]}"

    @dataclasses.dataclass(frozen=True)
    class NativeConfig(quantplug.QuantConfig):
        quant_method = name

    quantplug.register_backend(
        quantplug.Backend(
            name=name,
            config=NativeConfig,
            quantizer=f"{__name__}:NativeQuantizer",
            capabilities=quantplug.Capabilities(bits=(8,), native_experts=True),
            description="test int8 backend with native experts",
        )
    )
    return name


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def stored_keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())  # noqa: SIM118 (not a dict)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_native_backend_gets_the_stacked_experts_whole(arch, tmp_path):
    method = make_backend()
    model = tiny_moe(arch)
    ref = logits(model)
    report = quantplug.quantize(model, {"quant_method": method}, progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, Int8Experts) and not isinstance(experts, UnfusedExperts)
    assert "model.layers.0.mlp.experts" in report.converted and not experts_sites(model)
    assert model.quantplug_info.experts.keys() == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    out = logits(model)
    assert experts.calls == 1 and ((out - ref).norm() / ref.norm()) < 0.05
    assert report.bytes_after < report.bytes_before / 3

    folder = quantplug.save(model, tmp_path / "q")
    keys = stored_keys(folder)
    # under the names Transformers saves the model with (Mixtral: block_sparse_moe, its router too)
    site = "model.layers.0." + ("block_sparse_moe" if arch == "mixtral" else "mlp") + ".experts"
    assert f"{site}.gate_up" in keys and f"{site}.down_scale" in keys, sorted(keys)[:8]
    assert arch != "mixtral" or "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not [k for k in keys if ".experts.0." in k]
    assert torch.equal(logits(quantplug.load(folder, progress=False)), out)

    tiny_moe(arch).save_pretrained(tmp_path / "fp")
    on_load = quantplug.load(tmp_path / "fp", config={"quant_method": method}, progress=False)
    assert isinstance(on_load.model.layers[1].mlp.experts, Int8Experts)
    assert torch.equal(logits(on_load), out)

    register_with_transformers()
    bridged = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(bridged.model.layers[0].mlp.experts, Int8Experts)
    assert torch.equal(logits(bridged), out)


def test_a_native_backend_leaves_listed_experts_stacked_in_full_precision():
    method = make_backend()
    model = tiny_moe("qwen3_moe")
    report = quantplug.quantize(
        model,
        {"quant_method": method, "modules_to_not_convert": ["layers.1.mlp.experts", "lm_head"]},
        progress=False,
    )
    assert "model.layers.1.mlp.experts" in report.skipped
    assert list(experts_sites(model)) == ["model.layers.1.mlp.experts"]
    assert isinstance(model.model.layers[0].mlp.experts, Int8Experts)
