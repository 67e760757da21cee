"""Perplexity of the bitsandbytes modes demo/compare.py does not run (it runs for_bits(8) and
for_bits(4) = NF4), next to rtn at the same bits, on the same SmolLM2 text and windows.

    cd /work/main && HF_HUB_OFFLINE=1 python plugins/bnb/bench/extra_configs.py [--tokens 512]

Writes bench/results/quality-bnb/extra-configs.md (and prints the table).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

import quantplug

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("compare", ROOT / "demo" / "compare.py")
compare = importlib.util.module_from_spec(spec)
sys.modules["compare"] = compare
spec.loader.exec_module(compare)

CONFIGS = [
    ("bnb int8 (LLM.int8(), threshold 6)", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
    (
        "bnb int8, threshold 0 (no outlier columns)",
        {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 0.0},
    ),
    ("rtn int8 per-channel", {"quant_method": "rtn", "bits": 8, "group_size": -1}),
    ("bnb nf4", {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    (
        "bnb nf4 + double quant",
        {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
        },
    ),
    ("bnb fp4", {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}),
    ("rtn int4 g64 sym (bnb's block size)", {"quant_method": "rtn", "bits": 4, "group_size": 64}),
]


def quantized_linear_bytes(model) -> int:
    """Bytes of the converted layers as stored (codes, scales, quant state, bias)."""
    info = model.quantplug_info
    return sum(
        t.numel() * t.element_size()
        for name in info.modules
        for t in info.quantizer.module_tensors(name, model.get_submodule(name)).values()
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    folder, _ = compare.cache_smollm2(ROOT / "demo" / ".cache", lambda m: print(m, file=sys.stderr))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tok(compare.docs_text()[: args.tokens * 8], add_special_tokens=False).input_ids)
    ids = ids[: args.tokens]
    fp32 = quantplug.load(folder, progress=False).eval()
    base = compare.perplexity(fp32, ids, args.window)
    fp_bytes = compare.linear_bytes(fp32)
    del fp32
    rows = [("fp32", base, fp_bytes, None)]
    for label, cfg in CONFIGS:
        t0 = time.perf_counter()
        model = quantplug.load(folder, config=cfg, progress=False).eval()
        ppl = compare.perplexity(model, ids, args.window)
        rows.append((label, ppl, quantized_linear_bytes(model), cfg))
        print(f"{label}: ppl {ppl:.2f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        del model
    lines = [
        "# bitsandbytes modes on SmolLM2-135M-Instruct (CPU), next to rtn",
        "",
        f"Perplexity on the first {args.tokens} tokens of pydoc_data.topics, {args.window}-token windows "
        "(as `demo/compare.py --quick`). All Linear but the (tied) output head quantized on load.",
        "",
        "| config | converted Linear layers MiB | perplexity | vs fp32 |",
        "|---|---|---|---|",
    ]
    for label, ppl, nbytes, _ in rows:
        lines.append(f"| {label} | {nbytes / 2**20:.1f} | {ppl:.2f} | {(ppl / base - 1) * 100:+.1f}% |")
    lines += [
        "",
        "Caveat: SmolLM2's fp32 weights are dequantized from a Q4_1 GGUF (groups of 32), so 4-bit figures "
        "are flattered; compare 4-bit rows with each other.",
        f"Command: `HF_HUB_OFFLINE=1 python plugins/bnb/bench/extra_configs.py --tokens {args.tokens}`; "
        f"torch {torch.__version__}, bitsandbytes {quantplug.get_backend('bitsandbytes').status.library_versions['bitsandbytes']}.",
    ]
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results" / "quality-bnb" / "extra-configs.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
