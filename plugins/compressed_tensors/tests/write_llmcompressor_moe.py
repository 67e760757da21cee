"""Writes the MoE part of the zoo (tests/test_zoo_moe.py): a tiny bfloat16 mixture-of-experts model
(``quantplug.testing_models.tiny_moe``) saved by Transformers, loaded back the way llm-compressor
documents for Transformers 5 (``load_quantizable_moe``: Qwen3-MoE's experts load straight into
per-expert Linear modules, Mixtral's are linearized after loading), quantized by ``oneshot`` with a
data-free ``QuantizationModifier`` (a preset, or ``FP8_WEIGHT``: FP8 weights only) (routers ignored, as llm-compressor's MoE examples do) and saved
with ``save_pretrained(..., save_compressed=True)``; one folder per ``<arch>_<scheme>``.

Run in a child process with llm-compressor first on ``sys.path`` (see write_llmcompressor.py).

    python write_llmcompressor_moe.py OUT_FOLDER ARCH:SCHEME [ARCH:SCHEME ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import load_quantizable_moe
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM

from quantplug.testing_models import tiny_moe

#: the lm_head and the routers (``mlp.gate`` / ``block_sparse_moe.gate``) stay in full precision
IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"]
#: FP8 weights (per channel, as FP8_DYNAMIC stores them) without FP8_DYNAMIC's per-token input quantization
FP8_WEIGHT = {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
}


def _modifier(scheme: str) -> QuantizationModifier:
    if scheme == "FP8_WEIGHT":
        return QuantizationModifier(config_groups={"group_0": FP8_WEIGHT}, ignore=IGNORE)
    return QuantizationModifier(targets="Linear", scheme=scheme, ignore=IGNORE)


def write(out: Path, arch: str, scheme: str) -> Path:
    dense = out / f"dense_{arch}"
    if not dense.exists():
        tiny_moe(arch).to(torch.bfloat16).save_pretrained(dense)
    with load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
    oneshot(model=model, recipe=_modifier(scheme))
    folder = out / f"{arch}_{scheme.lower()}"
    model.save_pretrained(folder, save_compressed=True)
    return folder


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    for case in sys.argv[2:]:
        start = time.perf_counter()
        write(folder, *case.split(":"))
        print(f"{case}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
