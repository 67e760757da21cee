"""Mixture-of-experts models (Transformers 5's stacked experts): every expert is quantized, MoE
folders as Transformers saves them load (plain, quantize-on-load, pre-quantized, through the
bridge), quantplug writes Transformers' layout back, and what cannot be placed or quantized is an
error or a report with its bytes, never silent. Real Transformers models, the real rtn plugin."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import quantplug  # noqa: E402
from quantplug.experts import (  # noqa: E402
    UnfusedExperts,
    all_experts_see_all_tokens,
    experts_layout,
    experts_sites,
    register_experts_class,
    unfuse,
)
from quantplug.integrations.transformers import register_with_transformers  # noqa: E402
from quantplug.layers import set_submodule  # noqa: E402
from quantplug.model_size import model_size  # noqa: E402
from quantplug.testing_models import MOE_ARCHS, tiny_moe  # noqa: E402

INT8 = {"quant_method": "rtn", "bits": 8}
IDS = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def stored(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (not a dict)
    return out


@pytest.fixture(scope="module", params=MOE_ARCHS)
def hf_folder(request, tmp_path_factory):
    """A tiny MoE model saved by Transformers' own save_pretrained (its per-expert layout)."""
    folder = tmp_path_factory.mktemp(request.param) / "fp"
    tiny_moe(request.param).save_pretrained(folder)
    return folder


# -- the unfused module computes what the stacked one does -------------------------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unfused_experts_compute_what_the_stacked_module_computes(arch):
    model = tiny_moe(arch)
    ref = logits(model)
    sites = experts_sites(model)
    assert len(sites) == 2
    for name, layout in sites.items():
        stacked = model.get_submodule(name)
        unfused = unfuse(stacked, layout)
        # views of the stacked weights, no copies
        assert unfused.expert(3).proj("down").weight.untyped_storage().data_ptr() == (
            stacked.down_proj.untyped_storage().data_ptr()
        )
        set_submodule(model, name, unfused)
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unfused_experts_decode_one_token_at_a_time_as_the_stacked_module_does(arch):
    model, prompt = tiny_moe(arch), IDS[:1, :6]
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(prompt, **kwargs)
        for name, layout in experts_sites(model).items():
            set_submodule(model, name, unfuse(model.get_submodule(name), layout))
        out = model.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_llama4_experts_take_every_token_and_unfuse_from_the_registry():
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    config = Llama4TextConfig(hidden_size=64, intermediate_size=32, num_local_experts=4)
    experts = Llama4TextExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    layout = experts_layout(experts)
    assert layout is not None and layout.is_transposed and layout.routing == "all_tokens"
    x = torch.randn(4 * 5, 64)
    torch.testing.assert_close(unfuse(experts, layout)(x), experts(x), rtol=1e-5, atol=1e-6)


def test_calibration_switch_shows_every_expert_every_token_without_changing_outputs():
    model = tiny_moe("qwen3_moe")
    quantplug.quantize(model, {**INT8, "modules_to_not_convert": ["self_attn", "lm_head"]}, progress=False)
    seen: dict[str, int] = {}
    for name, module in model.named_modules():
        if ".experts." in name and name.endswith("gate_proj"):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0].shape[0]))
    ref = logits(model)
    routed = dict(seen)
    seen.clear()
    with all_experts_see_all_tokens(model):
        torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-6)
    assert len(seen) == 16 and set(seen.values()) == {IDS.numel()}
    assert sum(routed.values()) == 2 * 2 * IDS.numel()  # top-2 of 2 layers, without the switch


def test_gradients_reach_every_routed_expert():
    model = tiny_moe("mixtral").train()
    name, layout = next(iter(experts_sites(model).items()))
    set_submodule(model, name, unfuse(model.get_submodule(name), layout))
    model(IDS).logits.float().pow(2).mean().backward()
    unfused = model.get_submodule(name)
    grads = [unfused.expert(e).proj("down").weight.grad for e in range(layout.num_experts)]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) >= 2


# -- quantize: every expert, sizes, what stays stacked ------------------------------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_quantize_converts_every_expert_and_the_sizes_count_them(arch):
    model = tiny_moe(arch)
    before = model_size(model)
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report = quantplug.quantize(model, INT8, progress=False)
    assert len([n for n in report.converted if ".experts." in n]) == 2 * 8 * 3
    assert not experts_sites(model)
    assert before.quantizable_params / before.total_params > 0.8  # experts counted
    from quantplug.footprint import model_bytes

    assert model_bytes(model) / fp_bytes <= 0.35


def test_experts_listed_in_modules_to_not_convert_stay_stacked_and_are_reported_once():
    model = tiny_moe("mixtral")
    report = quantplug.quantize(
        model, {**INT8, "modules_to_not_convert": ["experts", "lm_head"]}, progress=False
    )
    assert len(experts_sites(model)) == 2  # put back as they were
    assert not [n for n in report.converted if "experts" in n]
    assert [k for k in report.skipped if "experts" in k] == [
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    ]
    assert "all 24 expert projections" in report.skipped["model.layers.0.mlp.experts"]


def _with_unknown_experts(model):
    """Replace each experts module with an undecorated class of the same layout."""

    class PlainExperts(nn.Module):
        def __init__(self, old):
            super().__init__()
            self.gate_up_proj, self.down_proj, self.act_fn = old.gate_up_proj, old.down_proj, old.act_fn

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return torch.zeros_like(hidden_states)

    for name in list(experts_sites(model)):
        set_submodule(model, name, PlainExperts(model.get_submodule(name)))
    return model


def test_stacked_weights_of_an_unknown_layout_are_reported_with_their_bytes(caplog):
    model = _with_unknown_experts(tiny_moe("qwen3_moe"))
    with caplog.at_level(logging.WARNING, logger="quantplug"):
        report = quantplug.quantize(model, INT8, progress=False)
    why = report.skipped["model.layers.0.mlp.experts"]
    assert "PlainExperts" in why and "6.0 MiB" in why and "register_experts_class" in why
    assert "left unquantized" in caplog.text
    with pytest.raises(quantplug.ConfigError, match="PlainExperts.*modules_to_not_convert"):
        quantplug.quantize(
            _with_unknown_experts(tiny_moe("qwen3_moe")), {**INT8, "modules_to_not_convert": []}
        )


def test_a_registered_layout_is_quantized():
    model = _with_unknown_experts(tiny_moe("qwen3_moe"))
    register_experts_class("PlainExperts")
    try:
        report = quantplug.quantize(model, INT8, progress=False)
    finally:
        from quantplug.experts import EXPERTS_CLASSES

        EXPERTS_CLASSES.pop("PlainExperts")
    assert len([n for n in report.converted if ".experts." in n]) == 48
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)


# -- folders Transformers saved ------------------------------------------------------------------


def test_plain_load_is_transformers_load_and_saves_its_layout(hf_folder, tmp_path):
    model = quantplug.load(hf_folder, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(hf_folder)
    assert type(model.model.layers[0].mlp.experts) is type(reference.model.layers[0].mlp.experts)
    assert torch.equal(logits(model), logits(reference))
    ours, theirs = stored(quantplug.save(model, tmp_path / "again")), stored(hf_folder)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_quantize_on_load_equals_quantizing_in_memory_and_round_trips(hf_folder, tmp_path):
    loaded = quantplug.load(hf_folder, config=INT8, progress=False)
    in_memory = AutoModelForCausalLM.from_pretrained(hf_folder)
    quantplug.quantize(in_memory, INT8, progress=False)
    assert loaded.quantplug_info.modules == in_memory.quantplug_info.modules
    assert torch.equal(logits(loaded), logits(in_memory))
    again = quantplug.load(quantplug.save(loaded, tmp_path / "q"), progress=False)
    assert torch.equal(logits(again), logits(loaded))


def test_a_stacked_checkpoint_loads_and_quantizes_one_expert_at_a_time(tmp_path):
    model = tiny_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "stacked", save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in stored(tmp_path / "stacked")
    assert torch.equal(logits(quantplug.load(tmp_path / "stacked", progress=False)), logits(model))
    quantized = quantplug.load(tmp_path / "stacked", config=INT8, progress=False)
    quantplug.quantize(model, INT8, progress=False)
    assert torch.equal(logits(quantized), logits(model))


def _edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_experts_that_do_not_fit_the_model_are_refused_naming_the_tensor(tmp_path):
    tiny_moe("mixtral").save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", num_local_experts=6)
    for config in (None, INT8):
        with pytest.raises(
            quantplug.CheckpointError, match=r"unexpected tensors .*block_sparse_moe\.experts\.[67]\."
        ):
            quantplug.load(tmp_path / "m", config=config, progress=False)
    _edit_config(tmp_path / "m", num_local_experts=8, intermediate_size=128)
    with pytest.raises(
        quantplug.CheckpointError,
        match=r"block_sparse_moe\.experts\.0\.w1\.weight' has shape \[256, 256\], expe",
    ):
        quantplug.load(tmp_path / "m", progress=False)
    with pytest.raises(
        quantplug.CheckpointError, match=r"block_sparse_moe\.experts\.0\.w1\.weight' has shape \[256, 256\]"
    ):
        quantplug.load(tmp_path / "m", config=INT8, progress=False)


def test_an_experts_tensor_that_finds_no_place_is_an_error(tmp_path):
    model = tiny_moe("qwen3_moe")
    quantplug.quantize(model, INT8, progress=False)
    folder = quantplug.save(model, tmp_path / "q")
    from safetensors.torch import save_file

    tensors = stored(folder)
    tensors["model.layers.0.mlp.experts.8.gate_proj.qweight"] = tensors[
        "model.layers.0.mlp.experts.0.gate_proj.qweight"
    ].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        quantplug.CheckpointError, match=r"unexpected tensors 'model\.layers\.0\.mlp\.experts\.8\.gate_proj"
    ):
        quantplug.load(folder, progress=False)


def test_model_size_of_a_folder_counts_stacked_experts_but_not_routers(tmp_path):
    tiny_moe("gpt_oss").save_pretrained(tmp_path / "g")  # gpt-oss is saved stacked
    size = model_size(tmp_path / "g")
    model = tiny_moe("gpt_oss")
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    linears = sum(
        m.weight.numel() for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n
    )
    assert size.quantizable_params == experts + linears


# -- through Transformers ------------------------------------------------------------------------


def test_the_transformers_bridge_quantizes_loads_and_saves_experts(hf_folder, tmp_path):
    register_with_transformers()
    ours = quantplug.load(hf_folder, config=INT8, progress=False)
    bridged = AutoModelForCausalLM.from_pretrained(hf_folder, quantization_config=INT8)
    assert sorted(bridged.quantplug_info.modules) == sorted(ours.quantplug_info.modules)
    assert torch.equal(logits(bridged), logits(ours))
    quantplug.save(ours, tmp_path / "q")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), logits(ours))
    bridged.save_pretrained(tmp_path / "hf")
    assert stored(tmp_path / "hf").keys() == stored(tmp_path / "q").keys()
    assert torch.equal(logits(quantplug.load(tmp_path / "hf", progress=False)), logits(ours))


def test_a_device_map_plans_and_offloads_experts_at_their_quantized_size(hf_folder, tmp_path):
    pytest.importorskip("accelerate")
    folder = quantplug.save(quantplug.load(hf_folder, config=INT8, progress=False), tmp_path / "q")
    resident = quantplug.load(folder, progress=False)
    offloaded = quantplug.load(
        folder,
        device_map={"": "cpu", "model.layers.1": "disk"},
        offload_folder=tmp_path / "off",
        progress=False,
    )
    assert offloaded.hf_device_map["model.layers.1"] == "disk"
    assert torch.equal(logits(offloaded), logits(resident))
    # a budget that holds the int8 model but not the fp32 one: planned at quantized sizes, it all fits
    from quantplug.footprint import model_bytes

    budget = int(model_bytes(resident) * 1.3)
    assert budget < 0.6 * model_bytes(AutoModelForCausalLM.from_pretrained(hf_folder))
    planned = quantplug.load(
        hf_folder,
        config=INT8,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=tmp_path / "o2",
        progress=False,
    )
    assert set(planned.hf_device_map.values()) == {"cpu"}, planned.hf_device_map
    assert torch.equal(logits(planned), logits(resident))


def test_compare_counts_the_experts_in_every_row(rtn_only):
    from quantplug.comparison import compare

    model = tiny_moe("qwen3_moe")
    experts = sum(
        p.numel() * 4 for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
    )
    result = compare(model, ["rtn:int8"], tokens=96, window=32, decode_tokens=2, repeats=1, dtype="float32")
    base, int8 = result.rows[0], result.rows[-1]
    assert base.weight_bytes > experts  # the unquantized row's weights include the stacked experts
    assert int8.label == "rtn:int8" and int8.left_full_precision == 0 and int8.converted == 2 * (4 + 8 * 3)
    assert int8.weight_bytes < base.weight_bytes / 3.5


@pytest.mark.parametrize(
    ("prefix", "names"),
    [
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
        ("block_sparse_moe", ("gate_proj", "up_proj", "down_proj")),
    ],
    ids=["gptqmodel-layout", "auto-round-layout"],
)
def test_mixtral_experts_stored_under_other_tools_names_load_and_save_back_as_they_were(
    prefix, names, tmp_path
):
    """Mixtral's experts in the layouts other tools write (GPTQModel: ``mlp.experts.{e}.gate_proj``;
    auto-round and llm-compressor: ``block_sparse_moe.experts.{e}.gate_proj``) load, and save
    writes back the names that were read, so the tool that wrote them reads them again."""
    from safetensors.torch import save_file

    model = tiny_moe("mixtral")
    quantplug.quantize(model, INT8, progress=False)
    expected = logits(model)
    folder = quantplug.save(model, tmp_path / "q")
    mapping = dict(zip(("w1", "w3", "w2"), names, strict=True))
    tensors = {}
    for key, t in stored(folder).items():
        if ".block_sparse_moe.experts." in key:
            head, _, tail = key.partition(".block_sparse_moe.experts.")
            e, proj, rest = tail.split(".", 2)
            key = f"{head}.{prefix}.experts.{e}.{mapping[proj]}.{rest}"
        tensors[key] = t
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = quantplug.load(folder, progress=False)
    assert torch.equal(logits(loaded), expected)
    again = stored(quantplug.save(loaded, tmp_path / "again"))
    assert again.keys() == tensors.keys()
    register_with_transformers()  # and Transformers, through the bridge, reads them by those names
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder)), expected)
