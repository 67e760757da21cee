"""Checkpoints in the field's ordinary layouts load as Transformers loads them (issue 18, item 7),
and strictness still catches what is really wrong.

The layouts, rebuilt on a tiny random BERT: a sentence-transformers folder (config.json names the
head class ``BertForMaskedLM``, the weights are the base ``BertModel``'s, without the ``bert.``
prefix), a head model's checkpoint loaded into its base model, and an older checkpoint that
stored a buffer the model computes (``embeddings.position_ids``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantplug
from quantplug_rtn import RtnConfig


def bert_config():
    from transformers import BertConfig

    return BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=120,
        max_position_embeddings=64,
    )


def ids():
    return torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(3))


def hidden(model, x):
    with torch.no_grad():
        return model(x).last_hidden_state


@pytest.fixture
def sentence_transformers_folder(tmp_path):
    """A base BertModel saved as sentence-transformers ships it: config.json names BertForMaskedLM."""
    from transformers import BertModel

    torch.manual_seed(0)
    base = BertModel(bert_config(), add_pooling_layer=False).eval()
    base.save_pretrained(tmp_path / "st")
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "st" / "config.json").write_text(json.dumps(config))
    return tmp_path / "st", base


def test_a_base_model_checkpoint_under_a_head_class_loads_the_base_model(
    sentence_transformers_folder, caplog
):
    folder, base = sentence_transformers_folder
    with caplog.at_level("WARNING", logger="quantplug"):
        model = quantplug.load(folder, progress=False)
    assert type(model).__name__ == "BertModel"
    assert "holds only the base model (BertModel) of BertForMaskedLM" in caplog.text
    torch.testing.assert_close(hidden(model, ids()), hidden(base, ids()), rtol=0, atol=0)
    # quantize-on-load works on that layout too
    q = quantplug.load(folder, config=RtnConfig(bits=8, group_size=-1), progress=False)
    assert q.quantplug_info.modules and type(q).__name__ == "BertModel"
    assert (hidden(q, ids()) - hidden(base, ids())).norm() / hidden(base, ids()).norm() < 0.05


def test_a_head_model_given_by_the_caller_reads_base_weights_under_its_prefix_and_names_the_missing_head(
    sentence_transformers_folder,
):
    from transformers import BertForMaskedLM

    folder, _ = sentence_transformers_folder
    with pytest.raises(quantplug.CheckpointError, match=r"missing tensors 'cls\.predictions"):
        quantplug.load(folder, model=BertForMaskedLM(bert_config()), progress=False)


def test_a_head_models_checkpoint_loads_into_its_base_model(tmp_path):
    from transformers import BertForMaskedLM, BertModel

    torch.manual_seed(0)
    full = BertForMaskedLM(bert_config()).eval()
    full.save_pretrained(tmp_path / "mlm")
    model = quantplug.load(
        tmp_path / "mlm", model=BertModel(bert_config(), add_pooling_layer=False), progress=False
    )
    torch.testing.assert_close(hidden(model, ids()), hidden(full.bert, ids()), rtol=0, atol=0)


def test_a_stored_computed_buffer_is_left_unread_but_other_extra_tensors_are_errors(
    sentence_transformers_folder, copy_of
):
    folder = copy_of(sentence_transformers_folder[0])
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)  # what older BERT checkpoints hold
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model = quantplug.load(folder, progress=False)
    torch.testing.assert_close(
        hidden(model, ids()), hidden(sentence_transformers_folder[1], ids()), rtol=0, atol=0
    )

    tensors["encoder.layer.0.attention.self.extra"] = torch.zeros(3)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(
        quantplug.CheckpointError, match=r"unexpected tensors 'encoder\.layer\.0\.attention\.self\.extra'"
    ):
        quantplug.load(folder, progress=False)
