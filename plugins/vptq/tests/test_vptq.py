"""VPTQ specifics: the unpacking and the dequantized weight against VPTQ's own code, per-layer
settings against the layers, and bad tensors named in errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import vptq_checkpoints as checkpoints
import vptq_reference as reference
from quantplug_vptq.config import VptqConfig, spec_of
from quantplug_vptq.layer import VptqLinear, unpack_indices
from safetensors.torch import load_file, save_file
from test_conformance import CASES
from torch import nn
from vptq_checkpoints import entry, llama_layers

import quantplug

LAYERS = {
    "plain": entry(96, 40, v=6, k=64),
    "groups": entry(96, 40, v=8, k=256, groups=3),
    "residual": entry(96, 40, v=12, k=256, res=16, groups=2),
    "outliers": entry(96, 40, v=4, k=16, outliers=(3, 32, 16), groups=2),
    "everything": entry(
        96, 41, v=12, k=1024, res=256, outliers=(5, 64, 6), groups=2, norm=True, perm=True, bias=True
    ),
    "k65536": entry(96, 40, v=8, k=65536, res=4096, norm=True, perm=True),
}


def _pair(name: str, dtype: torch.dtype, seed: int = 0):
    """VPTQ's layer (random, packed by VPTQ) and quantplug's, loaded from its state_dict."""
    e = LAYERS[name]
    linear = nn.Linear(e["in_features"], e["out_features"], bias=e["bias"])
    ref = checkpoints.fill(checkpoints.vptq_layer(linear, e, dtype), torch.Generator().manual_seed(seed))
    ours = VptqLinear(e["in_features"], e["out_features"], spec_of(e), bias=e["bias"], dtype=dtype)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LAYERS))
def test_weight_and_output_equal_vptqs_torch_path(name, dtype):
    ref, ours = _pair(name, dtype)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 5, ours.in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))  # VPTQ's quant_gemm: its dequant, then F.linear
        w = ours.dequantize()
    assert w.shape == (ours.out_features, ours.in_features) and w.dtype == dtype
    assert w.abs().sum() > 0


@pytest.mark.parametrize("name", ["everything", "k65536"])
def test_input_in_another_dtype_computes_as_vptq_on_the_cast_layer(name):
    """float16 tensors, float32 input: the result of VPTQ's layer with its floats cast to float32
    (what Transformers' load in float32 runs); the stored tensors stay float16."""
    ref, ours = _pair(name, torch.float16)
    x = torch.randn(2, ours.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(x), ref.float()(x))
    assert ours.centroids.weight.dtype == torch.float16


def _packed_words(gen, shape, words):
    return torch.randint(-(2**31), 2**31, (*shape, words), generator=gen, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize(
    "count,ib,rb", [(64, 6, 0), (60, 8, 4), (124, 8, 4), (37, 16, 8), (12, 16, 16), (3, 12, 0), (128, 16, 12)]
)
def test_unpack_equals_vptqs_unpack_index_tensor(count, ib, rb):
    """Any packed words (every bit pattern, sign bits included) unpack as VPTQ's own function does."""
    ref = reference.load()
    gen = torch.Generator().manual_seed(count * 100 + ib)
    packed = _packed_words(gen, (2, 5), math.ceil(count * (ib + rb) / 32))
    main, res = unpack_indices(packed, count, ib, rb)
    want_main, want_res = ref.unpack_index_tensor(packed, ib, count, rb, count if rb else 0)
    assert torch.equal(main, want_main.reshape(main.shape))
    assert (res is None) == (want_res is None)
    if rb:
        assert torch.equal(res, want_res.reshape(res.shape))


def test_unpack_reads_what_vptqs_pack_index_wrote():
    ref = reference.load()
    gen = torch.Generator().manual_seed(0)
    main = torch.randint(0, 65536, (1, 4, 50), generator=gen)
    res = torch.randint(0, 256, (1, 4, 50), generator=gen)
    as16 = lambda t: t.to(torch.uint16).view(torch.int16)  # noqa: E731
    packed = ref.pack_index(as16(main), 16, as16(res), 8)
    got_main, got_res = unpack_indices(packed, 50, 16, 8)
    assert torch.equal(got_main, main) and torch.equal(got_res, res)


# -- per-layer settings --------------------------------------------------------------------------


def test_layer_entry_lookup():
    cfg = VptqConfig.from_dict(
        {
            "config_for_layers": {"model.layers.0.mlp.down_proj": entry(256, 128, v=8, k=256)},
            "shared_layer_config": {"layers": entry(None, None, v=4, k=16)},
        }
    )
    assert cfg.layer_entry("model.layers.0.mlp.down_proj")[:2] == (
        "config_for_layers",
        "model.layers.0.mlp.down_proj",
    )
    # Transformers' key (the second component) and any run of whole components match
    assert cfg.layer_entry("model.layers.1.mlp.down_proj")[:2] == ("shared_layer_config", "layers")
    assert cfg.layer_entry("lm_head") is None  # Transformers: IndexError on "lm_head".rsplit(".")[1]
    by_suffix = VptqConfig.from_dict({"shared_layer_config": {"mlp.up_proj": entry(None, None, v=4, k=16)}})
    assert by_suffix.layer_entry("model.layers.3.mlp.up_proj")[1] == "mlp.up_proj"
    assert by_suffix.layer_entry("model.layers.3.mlp.gate_proj") is None
    both = VptqConfig.from_dict(
        {
            "shared_layer_config": {
                "layers": entry(None, None, v=4, k=16),
                "up_proj": entry(None, None, v=8, k=16),
            }
        }
    )
    with pytest.raises(quantplug.ConfigError, match="'layers', 'up_proj'") as err:
        both.layer_entry("model.layers.3.mlp.up_proj")
    assert err.value.field == "shared_layer_config"


def test_bad_entry_error_names_field_layer_and_key():
    with pytest.raises(quantplug.ConfigError) as err:
        VptqConfig.from_dict(
            {"config_for_layers": {"model.layers.0.mlp.up_proj": {**entry(128, 256, v=8, k=100)}}}
        )
    assert err.value.field == "config_for_layers"
    assert "config_for_layers['model.layers.0.mlp.up_proj'].num_centroids" in str(err.value)


def _written(tmp_path, qconfig=None, dtype=torch.float32):
    qconfig = qconfig or {"config_for_layers": llama_layers(v=8, k=64, outliers=(4, 16, 8), perm=True)}
    qconfig.setdefault("shared_layer_config", {})
    folder = tmp_path / "ckpt"
    folder.mkdir()
    checkpoints.write(folder, qconfig, dtype)
    return folder


def _edit_config(folder, edit):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data["quantization_config"])
    path.write_text(json.dumps(data))


def test_layer_missing_from_config_for_layers_is_named(tmp_path):
    folder = _written(tmp_path)
    _edit_config(folder, lambda q: q["config_for_layers"].pop("model.layers.1.self_attn.v_proj"))
    with pytest.raises(
        quantplug.ConfigError, match=r"'model.layers.1.self_attn.v_proj' has no entry in config_for_layers"
    ):
        quantplug.load(folder, progress=False)


def test_entry_that_does_not_fit_the_layer_is_named(tmp_path):
    folder = _written(tmp_path)

    def edit(q):
        q["config_for_layers"]["model.layers.0.mlp.down_proj"]["group_size"] = 200

    _edit_config(folder, edit)
    with pytest.raises(
        quantplug.ConfigError, match=r"config_for_layers\['model.layers.0.mlp.down_proj'\].group_num"
    ) as err:
        quantplug.load(folder, progress=False)
    assert "in_features 256" in str(err.value) and err.value.field == "config_for_layers"

    _edit_config(
        folder,
        lambda q: q["config_for_layers"]["model.layers.0.mlp.down_proj"].update(
            group_size=248, out_features=64
        ),
    )
    with pytest.raises(
        quantplug.ConfigError, match=r"\.out_features=64 but layer 'model.layers.0.mlp.down_proj' has 128"
    ):
        quantplug.load(folder, progress=False)


def _corrupt(folder, key, change):
    path = folder / "model.safetensors"
    state = load_file(path)
    state[key] = change(state[key])
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "key,change,match",
    [
        (
            "model.layers.0.mlp.up_proj.perm",
            lambda t: torch.zeros_like(t),
            r"up_proj\.perm: not a permutation",
        ),
        (
            "model.layers.1.self_attn.o_proj.outlier_indices",
            lambda t: torch.full_like(t, 16),
            r"o_proj\.outlier_indices: holds index 16, but the layer has 16 outlier centroids",
        ),
        (
            "model.layers.0.mlp.gate_proj.indices",
            lambda t: t.to(torch.int64),
            r"gate_proj\.indices' has dtype torch.int64",
        ),
        ("model.layers.0.mlp.gate_proj.indices", lambda t: t[:, :-1], r"gate_proj\.indices' has shape"),
        (
            "model.layers.0.mlp.gate_proj.centroids.weight",
            lambda t: t.to(torch.int32),
            r"gate_proj\.centroids\.weight",
        ),
    ],
)
def test_bad_tensors_are_named(tmp_path, key, change, match):
    folder = _written(tmp_path)
    _corrupt(folder, key, change)
    with pytest.raises(quantplug.CheckpointError, match=match):
        quantplug.load(folder, progress=False)


def test_unpacked_indices_are_explained(tmp_path):
    folder = _written(tmp_path)
    _corrupt(folder, "model.layers.0.mlp.gate_proj.indices", lambda t: t.to(torch.int16))
    with pytest.raises(quantplug.CheckpointError, match="unpacked"):
        quantplug.load(folder, progress=False)


def test_loaded_model_keeps_only_the_checkpoint_tensors(tmp_path):
    """No dense copy: the loaded layers hold exactly the stored tensors, and stay so after a forward."""
    folder = _written(tmp_path)
    model = quantplug.load(folder, progress=False)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, VptqLinear)
    stored = {
        k.removeprefix("model.layers.0.mlp.up_proj."): v
        for k, v in load_file(folder / "model.safetensors").items()
        if k.startswith("model.layers.0.mlp.up_proj.")
    }
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    mine = dict(layer.state_dict())
    assert mine.keys() == stored.keys() and all(torch.equal(mine[k], stored[k]) for k in stored)
    assert not list(layer.buffers()) and all(not p.requires_grad for p in layer.parameters())
    assert sum(t.numel() * t.element_size() for t in mine.values()) < layer.in_features * layer.out_features


@pytest.mark.parametrize("i", range(len(CASES)))
def test_logits_equal_vptqs_bit_for_bit(tmp_path, i):
    """Stricter than the kit's 1e-3: the same arithmetic as VPTQ's layers, in the same process."""
    config, dtype, model_kw = CASES[i]
    ids, want = checkpoints.write(tmp_path, json.loads(json.dumps(config)), dtype, seed=i, **model_kw)
    with torch.no_grad():
        got = quantplug.load(tmp_path, progress=False)(ids).logits
    assert got.dtype == dtype and torch.equal(got, want)
