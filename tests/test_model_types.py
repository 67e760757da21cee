"""``Preset.model_types``: a preset tied to one architecture (gpt-oss's MXFP4 experts format) is
ranked by ``select`` only for models of that type, and rejected with the reason for any other model
or for a model whose type a parameter count cannot tell."""

from __future__ import annotations

import pytest

import quantplug
from quantplug.selection import select

GPT_OSS = {"model_type": "gpt_oss", "hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 384}
LLAMA = {**GPT_OSS, "model_type": "llama"}


@pytest.fixture
def tied(make_backend, rtn_only):
    backend = make_backend(
        "tp-tied",
        capabilities=quantplug.Capabilities(bits=(4,), devices=("cpu", "cuda")),
        presets=(
            quantplug.Preset("experts4", {"bits": 4}, bits=4, bits_per_weight=4.25, model_types=("gpt_oss",)),
        ),
    )
    quantplug.register_backend(backend)
    return backend


def _verdict(sel, label="tp-tied:experts4"):
    if label in [c.label for c in sel.candidates]:
        return "ranked"
    return next(r for r in sel.rejected if f"{r.backend}:{r.preset}" == label)


def test_ranked_for_its_model_type(tied):
    assert _verdict(select(GPT_OSS, device="cpu")) == "ranked"


def test_rejected_for_another_model_type_saying_which(tied):
    rejection = _verdict(select(LLAMA, device="cpu"))
    assert rejection.reason == "applies to gpt_oss models only; this model is llama"


def test_rejected_for_a_parameter_count_with_what_to_pass_instead(tied):
    rejection = _verdict(select(7e9, device="cpu"))
    assert rejection.reason == "applies to gpt_oss models only; this model's type is not known"
    assert "its folder or its config" in rejection.fix


def test_the_model_type_is_read_from_a_module_and_a_folder(tmp_path):
    from quantplug.model_size import model_size
    from quantplug.testing_models import tiny_moe

    model = tiny_moe("gpt_oss")
    assert model_size(model).model_type == "gpt_oss"
    model.save_pretrained(tmp_path / "m")
    assert model_size(tmp_path / "m").model_type == "gpt_oss"
