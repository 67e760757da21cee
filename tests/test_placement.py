"""``quantplug.load(..., device_map=)``: accelerate's placement of quantized layers across devices
and disk, checked on the CPU against a single-device load of the same checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug_rtn import RtnConfig
from quantplug_rtn.quantizer import RtnQuantizer

pytest.importorskip("accelerate")


def resident_bytes(model) -> int:
    return sum(
        t.numel() * t.element_size()
        for t in [*model.parameters(), *model.buffers()]
        if t.device.type != "meta"
    )


@pytest.fixture(scope="module", params=["int4-float32", "int8-bfloat16-fused"])
def checkpoint(request, tmp_path_factory):
    """A saved 4-layer rtn model (int4 in float32: the portable layers; symmetric int8 per channel
    in bfloat16: layers the core's int8 kernel runs when loaded on one device) with its logits from a
    single-device load of rtn's own layers (kernel="none": a device_map load keeps the backend's
    modules, so that is what it must compute bit for bit)."""
    if request.param == "int4-float32":
        model, config = tiny_llama(num_hidden_layers=4), RtnConfig(bits=4, group_size=32)
    else:
        model, config = (
            tiny_llama(num_hidden_layers=4).to(torch.bfloat16),
            RtnConfig(bits=8, group_size=-1, symmetric=True),
        )
    quantplug.quantize(model, config, progress=False)
    folder = quantplug.save(model, tmp_path_factory.mktemp("placement") / "ckpt")
    ids = token_ids()
    return folder, ids, logits(quantplug.load(folder, progress=False, kernel="none"), ids)


def test_auto_map_within_max_memory_offloads_the_rest_to_disk_with_identical_outputs(checkpoint, tmp_path):
    folder, ids, ref = checkpoint
    whole = resident_bytes(quantplug.load(folder, progress=False))
    budget = int(whole * 0.75)
    model = quantplug.load(
        folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off", progress=False
    )
    placed = model.hf_device_map
    assert "cpu" in placed.values() and "disk" in placed.values(), placed
    assert resident_bytes(model) <= budget
    # the quantized layers on disk were written in their own layout, one file per tensor
    on_disk = [
        name for name, device in placed.items() if device == "disk" and name.startswith("model.layers.")
    ]
    index = json.loads((tmp_path / "off" / "index.json").read_text())
    layer = on_disk[0] + ".mlp.down_proj"
    assert any(k.startswith(layer + ".") and index[k]["dtype"] in ("int8", "uint8") for k in index), index
    assert model.get_submodule(layer).__class__.__name__ == "RtnLinear"
    assert torch.equal(logits(model, ids), ref)
    assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_a_dict_map_places_each_module_where_it_says(checkpoint, tmp_path):
    folder, ids, ref = checkpoint
    model = quantplug.load(
        folder,
        device_map={"": "cpu", "model.layers.1": "disk", "lm_head": "disk"},
        offload_folder=tmp_path / "off",
        progress=False,
    )
    assert model.hf_device_map["model.layers.1"] == "disk" and model.hf_device_map["model.layers.0"] == "cpu"
    assert model.model.layers[1].self_attn.q_proj.scale.device.type == "meta"  # brought in per forward
    assert model.model.layers[0].self_attn.q_proj.scale.device.type == "cpu"
    assert model.lm_head.weight.device.type == "meta"
    assert torch.equal(logits(model, ids), ref)


def test_quantize_on_load_places_each_layer_as_it_is_quantized(tmp_path):
    fp = tiny_llama(num_hidden_layers=4)
    fp.save_pretrained(tmp_path / "fp")
    config = RtnConfig(bits=4, group_size=32)
    ids = token_ids()
    ref = logits(quantplug.load(tmp_path / "fp", config=config, progress=False), ids)
    model = quantplug.load(
        tmp_path / "fp",
        config=config,
        device_map={"": "cpu", "model.layers.2": "disk", "model.layers.3": "disk"},
        offload_folder=tmp_path / "off",
        progress=False,
    )
    index = json.loads((tmp_path / "off" / "index.json").read_text())
    assert "model.layers.2.mlp.up_proj.qweight" in index and "model.layers.2.mlp.up_proj.weight" not in index
    assert model.quantplug_info.modules[-1] == "model.layers.3.mlp.down_proj"
    assert torch.equal(logits(model, ids), ref)


def test_the_plan_counts_layers_at_their_quantized_size(checkpoint, tmp_path):
    """A budget that holds the 4-bit model but not its full-precision original: accelerate, shown
    the quantized sizes, keeps every module in memory."""
    folder, ids, ref = checkpoint
    quantized = resident_bytes(quantplug.load(folder, progress=False))
    full = resident_bytes(tiny_llama(num_hidden_layers=4))
    budget = int(quantized * 1.6)
    assert budget < full * 0.8
    model = quantplug.load(
        folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off", progress=False
    )
    assert set(model.hf_device_map.values()) == {"cpu"}, model.hf_device_map
    assert not (tmp_path / "off" / "index.json").exists()
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"device_map": {"": "cuda:0"}},
            "device 'cuda:0', which this machine does not have; its devices are cpu, disk",
        ),
        ({"device_map": {"": 3}}, "device 3, which this machine does not have"),
        ({"device_map": "auto", "max_memory": {"cuda:1": "1GiB"}}, "max_memory names device 'cuda:1'"),
        (
            {"device_map": {"": "cpu", "model.nope": "cpu"}},
            "'model.nope' names no module of LlamaForCausalLM",
        ),
        ({"device_map": {"model.layers.0": "cpu"}}, "does not place every tensor"),
        (
            {"device_map": {"": "cpu", "model.layers.0.mlp.down_proj.weight": "cpu"}},
            "inside the quantized layer 'model.layers.0.mlp.down_proj'",
        ),
        ({"device_map": {"": "cpu", "model.layers.1": "disk"}}, "pass offload_folder="),
        (
            {"device_map": "auto", "max_memory": {"cpu": "lots"}},
            r"max_memory\['cpu'\] = 'lots' is not a size",
        ),
        ({"device_map": "best"}, "not a strategy; use one of auto, balanced, balanced_low_0, sequential"),
        ({"device_map": {"": "cpu"}, "max_memory": {"cpu": "1GiB"}}, "max_memory is for device_map='auto'"),
        ({"device": "cpu", "device_map": "auto"}, "not both"),
        ({"max_memory": {"cpu": "1GiB"}}, "apply only with device_map="),
    ],
)
def test_bad_placement_is_a_config_error_before_anything_is_read(rtn_checkpoint, tmp_path, kwargs, message):
    with pytest.raises(quantplug.ConfigError, match=message):
        quantplug.load(rtn_checkpoint[0], progress=False, **kwargs)


@dataclasses.dataclass(frozen=True)
class UndeclaredConfig(RtnConfig):
    quant_method = "test-undeclared-offload"


class UndeclaredQuantizer(RtnQuantizer):
    """rtn's layers under a plugin that has not declared them offloadable (the default)."""

    offload_refusal = quantplug.Quantizer.offload_refusal


def test_a_backend_that_does_not_declare_offloading_is_refused_naming_layer_and_backend(tmp_path):
    quantplug.register_backend(
        quantplug.Backend(
            name=UndeclaredConfig.quant_method,
            config=UndeclaredConfig,
            quantizer=f"{__name__}:UndeclaredQuantizer",
            capabilities=quantplug.Capabilities(bits=(4, 8)),
        )
    )
    tiny_llama().save_pretrained(tmp_path / "fp")
    with pytest.raises(quantplug.ConfigError) as err:
        quantplug.load(
            tmp_path / "fp",
            config=UndeclaredConfig(bits=4),
            device_map={"": "cpu", "model.layers.1": "disk"},
            offload_folder=tmp_path / "off",
            progress=False,
        )
    text = str(err.value)
    assert (
        "'model.layers.1.self_attn.q_proj'" in text
        and "'test-undeclared-offload' cannot be offloaded" in text
    )
    assert "Quantizer.offload_refusal" in text and "quantplug-rtn" in text
    assert not any((tmp_path / "off").iterdir())  # refused before any layer was read or written
    # resident on one device it loads as usual
    model = quantplug.load(
        tmp_path / "fp", config=UndeclaredConfig(bits=4), device_map={"": "cpu"}, progress=False
    )
    assert model.hf_device_map == {"": "cpu"}


def test_saving_an_offloaded_model_says_to_load_it_resident(rtn_checkpoint, tmp_path):
    model = quantplug.load(
        rtn_checkpoint[0],
        device_map={"": "cpu", "model.layers.1": "disk"},
        offload_folder=tmp_path / "off",
        progress=False,
    )
    with pytest.raises(quantplug.CheckpointError, match="offloaded by accelerate .* load it with device="):
        quantplug.save(model, tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(
    "placement",
    [
        {"": "cpu", "model.embed_tokens": "disk"},  # the tied head stays in memory: read again, not shared
        {"": "cpu", "lm_head": "disk", "model.layers.0": "disk"},
        {"": "disk"},
    ],
    ids=["embedding-on-disk", "head-on-disk", "all-on-disk"],
)
def test_tied_embeddings_split_across_memory_and_disk(tmp_path, placement):
    model = tiny_llama(tie_word_embeddings=True)
    quantplug.quantize(model, RtnConfig(bits=4), progress=False)
    folder = quantplug.save(model, tmp_path / "ckpt")
    ids = token_ids()
    ref = logits(quantplug.load(folder, progress=False), ids)
    placed = quantplug.load(folder, device_map=placement, offload_folder=tmp_path / "off", progress=False)
    assert torch.equal(logits(placed, ids), ref)


def test_a_plain_checkpoint_is_placed_too(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    ids = token_ids()
    ref = logits(quantplug.load(tmp_path / "fp", progress=False), ids)
    model = quantplug.load(
        tmp_path / "fp",
        device_map={"": "cpu", "model.layers.1": "disk"},
        offload_folder=tmp_path / "off",
        progress=False,
    )
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert "model.layers.1.mlp.up_proj.weight" in json.loads((tmp_path / "off" / "index.json").read_text())
    assert torch.equal(logits(model, ids), ref)
