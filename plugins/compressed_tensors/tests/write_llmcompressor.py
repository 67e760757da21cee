"""Writes the llm-compressor part of the zoo (tests/test_zoo.py): a tiny bfloat16 Llama quantized by
llm-compressor's own ``oneshot`` with its documented recipes, saved with ``save_pretrained(...,
save_compressed=True)``, one folder per recipe.

Run in a child process with llm-compressor first on ``sys.path``: llm-compressor 0.14.0.1 pins
compressed-tensors 0.19.0 and Transformers <= 5.17, while the plugin needs compressed-tensors 0.20,
so the compressed_tensors tox env installs those three into a folder of their own
(``QUANTPLUG_LLMCOMPRESSOR_PATH``), as a user quantizes in one environment and loads in another.

    python write_llmcompressor.py OUT_FOLDER [RECIPE ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
from llmcompressor.pipelines.cache import IntermediatesCache

from quantplug.testing import tiny_llama, token_ids

# llm-compressor 0.14 pins AWQ's cached activations with Tensor.pin_memory(), which raises "Cannot
# access accelerator device when none is available" on a CPU-only machine; pinning only speeds up
# copies to a GPU, so it is skipped here (the arithmetic is unchanged)
IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

IGNORE = ["lm_head"]
#: recipe name -> llm-compressor modifiers, as its examples write them (AWQ with a coarser grid
#: search than its default 20 points, to keep the test short)
RECIPES = {
    "gptq_w4a16": lambda: GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE),
    "awq_w4a16": lambda: AWQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE, n_grid=4),
    "awq_w4a16_asym": lambda: AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=IGNORE, n_grid=4),
    "smoothquant_gptq_w8a8": lambda: [
        SmoothQuantModifier(smoothing_strength=0.8),
        GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE),
    ],
    "w8a8": lambda: QuantizationModifier(targets="Linear", scheme="W8A8", ignore=IGNORE),
    "fp8_dynamic": lambda: QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE),
    "fp8_static": lambda: QuantizationModifier(targets="Linear", scheme="FP8", ignore=IGNORE),
}


def _tokenizer():
    """A word-level tokenizer over the tiny model's 384 ids ("t0" ... "t383"): oneshot needs a
    processor with a dataset, and nothing is downloaded here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(384)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def _calibration(n: int = 4, seq: int = 16) -> Dataset:
    ids = torch.cat([token_ids(shape=(1, seq), seed=20 + i) for i in range(n)])
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def write(out: Path, name: str) -> Path:
    model = tiny_llama().to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    dense = out / "dense"  # oneshot reads the model's config back from its name_or_path
    model.save_pretrained(dense)
    model.config._name_or_path = str(dense)
    oneshot(
        model=model,
        dataset=_calibration(),
        recipe=RECIPES[name](),
        processor=_tokenizer(),
        max_seq_length=16,
        num_calibration_samples=4,
    )
    model.save_pretrained(out / name, save_compressed=True)
    return out / name


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    for recipe in sys.argv[2:] or list(RECIPES):
        start = time.perf_counter()
        write(folder, recipe)
        print(f"{recipe}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
