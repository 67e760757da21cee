"""``compare`` scores encoders as their users use them (issue 19, part 3): pooled sentence
embeddings (cosine and recall@10 of the unquantized model's neighbours) for base models, label
agreement for classifiers; the quality limit and the recommendation use that figure."""

from __future__ import annotations

import json

import pytest
import torch

import quantplug
from quantplug.comparison import compare
from quantplug.encoder_quality import (
    SentenceBench,
    _recall,
    detect_task,
    pooling_of,
    score,
    sentence_bench,
    sentences,
)
from quantplug.recommendation import loss_of
from quantplug.text_quality import default_text

SMALL = {"repeats": 1, "dtype": "float32", "prefill_tokens": 16}


def tiny_bert(head: str = ""):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256, num_labels=3,
    )  # fmt: skip
    return (BertForSequenceClassification if head else BertModel)(config).eval()


def test_the_task_comes_from_the_models_class():
    assert detect_task(tiny_bert(), causal=False) == "feature-extraction"
    assert detect_task(tiny_bert("cls"), causal=False) == "sequence-classification"
    assert detect_task(torch.nn.Linear(2, 2), causal=False) == "outputs"
    assert detect_task(tiny_bert(), causal=True) == "causal-lm"


def test_an_encoder_is_scored_by_sentence_embeddings_and_neighbours(rtn_only):
    result = compare(tiny_bert(), ["rtn:int8", "rtn:int2-g32-asym"], **SMALL)
    base, int8, int2 = result.rows
    assert base.embedding_cosine == pytest.approx(1.0) and base.recall_at_10 == pytest.approx(1.0)
    assert 0.99 < int8.embedding_cosine <= 1.0 and int8.recall_at_10 > 0.8
    assert int2.embedding_cosine < int8.embedding_cosine and int2.recall_at_10 <= int8.recall_at_10
    assert loss_of(int8, base) == pytest.approx(1 - int8.embedding_cosine)  # what the limit judges
    assert "mean-pooled sentence embeddings of 256 sentences" in result.settings["quality"]
    table = result.table()
    assert "| embedding cosine (recall@10) |" in table
    data = json.loads(json.dumps(result.to_dict()))
    assert data["rows"][1]["embedding_cosine"] == int8.embedding_cosine
    assert "embedding cosine" in result.recommendation or result.recommended is not None


def test_the_limit_and_the_recommendation_use_the_embedding_cosine(rtn_only):
    # int8's hidden states move more than 1e-3 relative, its embeddings' cosine much less
    loose = compare(tiny_bert(), ["rtn:int8"], max_quality_loss=0.01, **SMALL)
    int8 = loose.rows[1]
    assert int8.output_rel_error > 1 - int8.embedding_cosine
    assert int8.acceptable and loose.recommended == "rtn:int8"
    strict = compare(tiny_bert(), ["rtn:int8"], max_quality_loss=0.0, **SMALL)
    assert not strict.rows[1].acceptable and "embedding cosine" in strict.recommendation


def test_a_classifier_is_scored_by_label_agreement(rtn_only):
    result = compare(tiny_bert("cls"), ["rtn:int8"], **SMALL)
    base, int8 = result.rows
    assert base.label_agreement == 1.0 and 0.5 < int8.label_agreement <= 1.0
    assert "| label agreement |" in result.table() and "labels of 256 sentences" in result.settings["quality"]


def test_outputs_task_keeps_the_output_error(rtn_only):
    result = compare(tiny_bert(), ["rtn:int8"], task="outputs", **SMALL)
    assert result.rows[1].embedding_cosine is None and result.rows[1].output_rel_error > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"task": "embeddings"}, "unknown task 'embeddings'; the tasks are causal-lm, feature-extraction"),
        ({"task": "causal-lm"}, "does not fit BertModel"),
        ({"task": "feature-extraction", "inputs": torch.zeros(1, 4, dtype=torch.long)}, "leave inputs= out"),
    ],
)
def test_a_bad_task_is_a_config_error_naming_it(kwargs, match, rtn_only):
    with pytest.raises(quantplug.ConfigError, match=match):
        compare(tiny_bert(), ["rtn:int8"], **SMALL, **kwargs)


def test_recall_counts_the_neighbours_kept():
    torch.manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    assert _recall(ref, ref) == 1.0
    shuffled = ref[torch.randperm(40)]  # every sentence gets another's embedding: neighbours lost
    assert _recall(shuffled, ref) < 0.5


def test_the_folders_pooling_is_used(tmp_path):
    assert pooling_of(tmp_path) == "mean"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert pooling_of(tmp_path) == "cls"
    model = tiny_bert()
    sb = sentence_bench(default_text(), None, 300, torch.device("cpu"), "cls", n=16)
    score(model, sb, "feature-extraction")
    with torch.no_grad():
        first = model(**sb.batches[0]).last_hidden_state[:, 0]
    assert torch.allclose(sb.reference[:16], torch.nn.functional.normalize(first, dim=-1), atol=1e-6)


def test_sentences_are_prose_from_the_text_and_too_few_is_an_error():
    chosen = sentences(default_text(), 64)
    assert len(chosen) == 64 and all(s.endswith(".") and 8 <= len(s.split()) <= 40 for s in chosen)
    with pytest.raises(quantplug.ConfigError, match="sentences"):
        sentence_bench("One short line.", None, 300, torch.device("cpu"), "mean")
    assert isinstance(
        sentence_bench(default_text(), None, 300, torch.device("cpu"), "mean", n=16), SentenceBench
    )


def test_cli_task_choices_are_listed_for_an_unknown_one(tmp_path):
    from click.testing import CliRunner

    from quantplug.cli import main
    from quantplug.encoder_quality import TASKS

    tiny_bert().save_pretrained(tmp_path / "bert")
    out = CliRunner().invoke(main, ["compare", str(tmp_path / "bert"), "--task", "embeddings"])
    assert out.exit_code == 2 and all(t in out.output for t in TASKS)
