"""AWQ checkpoints (gemm layout) through quantplug-gptqmodel: tests/data/awq-tiny was written by
auto-round (tests/data/make_awq_checkpoint.py); it loads with the logits Transformers' own AWQ
integration gives, re-saves unchanged, and quantizing with AWQ is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_gptq import VOCAB, _logits, _rel, _transformers_logits

import quantplug
from quantplug.testing import tiny_llama, token_ids

AWQ = Path(__file__).resolve().parent / "data" / "awq-tiny"


def test_awq_checkpoint_loads_with_transformers_logits(tmp_path):
    ids = token_ids(VOCAB, (2, 12), seed=99)
    theirs = _transformers_logits(AWQ, ids, tmp_path)
    own = quantplug.load(AWQ, progress=False, kernel="none")  # GPTQModel's AWQ forward
    assert type(own.model.layers[0].mlp.down_proj).__name__ == "AwqLinear"
    model = quantplug.load(AWQ, progress=False)  # the same grids on torch's fused int4 CPU kernel
    assert set(quantplug.kernel_choices(model).values()) == {"torch-int4-cpu"}
    for ours in (_logits(own, ids), _logits(model, ids)):
        assert _rel(ours, theirs) < 0.02, _rel(ours, theirs)
        assert _rel(ours, _logits(tiny_llama(), ids)) < 0.3  # the quantized model, not random weights


def test_awq_checkpoint_resaves_unchanged_after_running(tmp_path):
    model = quantplug.load(AWQ, progress=False)
    _logits(model, token_ids(VOCAB, (1, 8)))  # running must not change what is stored
    out = quantplug.save(model, tmp_path / "again")
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(f))
    original = load_file(AWQ / "model.safetensors")
    packed = [k for k in original if k.endswith((".qweight", ".qzeros", ".scales"))]
    assert packed
    for key in packed:
        assert saved[key].dtype == original[key].dtype and torch.equal(saved[key], original[key]), key
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["format"] == "gemm"
    assert (
        _rel(_logits(quantplug.load(out, progress=False), token_ids(VOCAB)), _logits(model, token_ids(VOCAB)))
        == 0
    )


def test_quantizing_with_awq_is_refused_naming_the_device():
    model = tiny_llama()
    with pytest.raises(quantplug.BackendUnavailableError, match="'cpu'.*needs CUDA"):
        quantplug.quantize(model, {"quant_method": "awq", "bits": 4}, progress=False)
    assert all(type(m).__name__ != "AwqLinear" for m in model.modules())


def test_awq_is_never_proposed_by_select():
    sel = quantplug.select(1_000_000_000, device="cpu", calibration_data=True)
    assert all(c.backend != "awq" for c in sel.candidates)
    assert any(r.backend == "awq" and "does not quantize" in r.reason for r in sel.rejected)


@pytest.mark.parametrize(
    "change, field",
    [({"version": "gemv"}, "format"), ({"bits": 3}, "bits"), ({"data_type": "fp"}, "data_type")],
)
def test_awq_layouts_this_plugin_cannot_read_are_refused_by_name(change, field, tmp_path):
    folder = tmp_path / "awq"
    shutil.copytree(AWQ, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(quantplug.ConfigError) as info:
        quantplug.load(folder, progress=False)
    assert info.value.field == field


def test_transformers_awqconfig_dict_is_accepted():
    from transformers import AwqConfig

    config = quantplug.config_from_dict(AwqConfig(bits=4, group_size=64).to_dict())
    assert (config.bits, config.group_size, config.zero_point, config.format) == (4, 64, True, "gemm")
