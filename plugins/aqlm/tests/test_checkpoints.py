"""AQLM checkpoints: which layers stay dense (``linear_weights_not_to_quantize`` holds parameter
names), and tensors of the wrong shape or dtype refused with the tensor named."""

import json

import aqlm_ref
import pytest
import torch
from quantplug_aqlm import AqlmConfig
from quantplug_aqlm.modules import AqlmLinear
from safetensors.torch import load_file, save_file
from torch import nn

import quantplug
import quantplug.matching

TWO_X_EIGHT = {"num_codebooks": 2, "nbits_per_codebook": 8}
LAYER = "model.layers.0.self_attn.q_proj"


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_parameter_names_map_to_modules():
    config = AqlmConfig(
        linear_weights_not_to_quantize=["model.embed_tokens.weight", "lm_head.weight", "lm_head"]
    )
    assert config.linear_modules_not_to_quantize == ("model.embed_tokens", "lm_head", "lm_head")
    data = config.to_dict()
    assert "linear_modules_not_to_quantize" not in data  # derived, never written
    assert data["linear_weights_not_to_quantize"] == [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "lm_head",
    ]
    assert AqlmConfig.from_dict(data) == config
    rules = AqlmConfig.skip_rules
    assert "linear_modules_not_to_quantize" in AqlmConfig.skip_aliases
    assert quantplug.matching.matches("lm_head", config.linear_modules_not_to_quantize, rules)
    # Transformers' module-name rule does not match lm_head by "lm_head.weight" (its 5.25 trap)
    assert not quantplug.matching.matches(
        "lm_head", ["model.embed_tokens.weight", "lm_head.weight"], ("transformers",)
    )
    # whole dotted components: layer 1 is not layer 11
    listed = AqlmConfig(linear_weights_not_to_quantize=["model.layers.1.mlp.down_proj.weight"])
    assert quantplug.matching.matches(
        "model.layers.1.mlp.down_proj", listed.linear_modules_not_to_quantize, rules
    )
    assert not quantplug.matching.matches(
        "model.layers.11.mlp.down_proj", listed.linear_modules_not_to_quantize, rules
    )


@pytest.mark.parametrize("modules_to_not_convert", [None, []])
def test_listed_layers_and_lm_head_load_dense(tmp_path, modules_to_not_convert):
    """lm_head.weight and a listed decoder layer are stored dense: they load dense, with aqlm's logits,
    also when modules_to_not_convert=[] turns quantplug's own default (keep the output head) off."""
    dense = ("model.layers.1.mlp.down_proj",)
    folder = tmp_path / "ckpt"
    ids, ref = aqlm_ref.write(folder, TWO_X_EIGHT, dense=dense)
    if modules_to_not_convert is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["modules_to_not_convert"] = modules_to_not_convert
        (folder / "config.json").write_text(json.dumps(config))
    stored = load_file(folder / "model.safetensors")
    assert "lm_head.weight" in stored and f"{dense[0]}.weight" in stored
    model = quantplug.load(folder, progress=False)
    assert type(model.lm_head) is nn.Linear and type(model.get_submodule(dense[0])) is nn.Linear
    assert isinstance(model.get_submodule("model.layers.1.mlp.up_proj"), AqlmLinear)
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 1e-4


def test_float16_checkpoint_runs_in_float16(tmp_path):
    """Published checkpoints say dtype float16: the model loads in float16 on CPU, its AQLM tensors as
    stored, within float16 rounding of aqlm's float32 logits."""
    ids, ref = aqlm_ref.write(tmp_path, TWO_X_EIGHT, dtype=torch.float16)
    model = quantplug.load(tmp_path, progress=False)
    layer = model.get_submodule(LAYER)
    assert model.lm_head.weight.dtype == torch.float16 and layer.codebooks.dtype == torch.float16
    with torch.no_grad():
        out = model(ids).logits
        step = model(ids[:, :1]).logits  # one token per row: the look-up table
    assert out.dtype == torch.float16 and _rel(out, ref) < 1e-2
    assert _rel(step, ref[:, :1]) < 1e-2


def test_unlisted_dense_layer_is_refused_by_name(tmp_path):
    """A dense decoder layer that linear_weights_not_to_quantize does not name is not AQLM's: refused."""
    folder = tmp_path / "ckpt"
    aqlm_ref.write(folder, TWO_X_EIGHT, dense=("model.layers.1.mlp.down_proj",))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["linear_weights_not_to_quantize"] = list(aqlm_ref.DEFAULT_SKIPS)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(quantplug.CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.codes"):
        quantplug.load(folder, progress=False)


def _corrupt(folder, key, tensor):
    state = load_file(folder / "model.safetensors")
    state[key] = tensor(state[key])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


BAD = {
    "codes int16": ("codes", lambda t: t.to(torch.int16), r"dtype torch\.int16, expected torch\.int8"),
    "codes float": ("codes", lambda t: t.to(torch.float16), r"dtype torch\.float16, expected torch\.int8"),
    "codes short": (
        "codes",
        lambda t: t[:, :-1].contiguous(),
        r"shape \[128, 15, 2\], expected \[128, 16, 2\]",
    ),
    "codes transposed": ("codes", lambda t: t.permute(1, 0, 2).contiguous(), "transposed"),
    "codes one codebook": ("codes", lambda t: t[..., :1].contiguous(), "number of codebooks"),
    "codebooks 16-bit size": (
        "codebooks",
        lambda t: t.repeat(1, 2, 1, 1),
        r"shape \[2, 512, 1, 8\], expected \[2, 256, 1, 8\]",
    ),
    "codebooks int": ("codebooks", lambda t: t.to(torch.int8), r"dtype torch\.int8.*as floats"),
    "scales flat": ("scales", lambda t: t.flatten(), r"shape \[128\], expected \[128, 1, 1, 1\]"),
    "scales int": ("scales", lambda t: t.to(torch.int32), r"dtype torch\.int32.*as floats"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensors_are_refused_with_the_tensor_named(tmp_path, case):
    key, change, what = BAD[case]
    folder = tmp_path / "ckpt"
    aqlm_ref.write(folder, TWO_X_EIGHT)
    _corrupt(folder, f"{LAYER}.{key}", change)
    with pytest.raises(quantplug.CheckpointError, match=rf"{LAYER}\.{key}") as err:
        quantplug.load(folder, progress=False)
    assert err.match(what)


def test_load_module_checks_what_the_core_does_not(tmp_path):
    """Called on its own (as the Transformers bridge may), load_module names the tensor too."""
    quantizer = quantplug.AutoQuantizer.from_config(AqlmConfig(**TWO_X_EIGHT))
    linear = nn.Linear(64, 32, bias=False, device="meta")
    good = {
        k: torch.zeros(v[0], dtype=v[1] or torch.float16)
        for k, v in quantizer.expected_tensors("x", linear).items()
    }
    assert isinstance(quantizer.load_module("x", linear, dict(good)), AqlmLinear)
    with pytest.raises(quantplug.CheckpointError, match=r"'x\.scales' has dtype torch\.int8"):
        quantizer.load_module("x", linear, {**good, "scales": good["scales"].to(torch.int8)})
    with pytest.raises(quantplug.CheckpointError, match=r"missing \['codebooks'\]"):
        quantizer.load_module("x", linear, {k: v for k, v in good.items() if k != "codebooks"})


def test_quantize_refusal_says_why_and_what_instead():
    with pytest.raises(quantplug.BackendUnavailableError) as err:
        quantplug.quantize(quantplug.testing.tiny_llama(), AqlmConfig(), progress=False)
    message = str(err.value)
    assert "github.com/Vahe1994/AQLM" in message and "main.py" in message
    assert "quantplug.load" in message and "quantplug select" in message
