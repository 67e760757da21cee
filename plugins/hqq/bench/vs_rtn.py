"""HQQ next to plain round-to-nearest (quantplug-rtn, asymmetric) at the same bits AND the same
group size, on the real SmolLM2-135M-Instruct that demo/prepare.py caches. Needs quantplug-rtn
installed (a benchmark, not a test).

bench/quality.py's rows use each backend's own presets (hqq: group 64; rtn: 128 symmetric and 32
asymmetric), and SmolLM2's weights come from a Q4_1 GGUF (4-bit, groups of 32,
asymmetric), which rtn's int4 g32 asym nearly reproduces. This script pairs the configs exactly.

    python plugins/hqq/bench_vs_rtn.py --out-dir bench/results/quality-hqq
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import quantplug

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "demo"))
import prepare  # noqa: E402  (demo/prepare.py: the same cached model)

from quantplug.comparison import default_text, perplexity  # noqa: E402  (the same text and perplexity)

# 3 bits: rtn has none. 128 does not divide SmolLM2's hidden size 576: hqq refuses it (rtn pads).
PAIRS = [(4, 32), (4, 64), (2, 32), (2, 64)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench/results/quality-hqq")
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from transformers import AutoTokenizer

    folder = prepare.smollm2_folder(REPO / "demo/.cache", log)
    tok = AutoTokenizer.from_pretrained(folder)
    fp32 = quantplug.load(folder, progress=False).eval()
    ids = torch.tensor(tok(default_text()[: args.tokens * 8], add_special_tokens=False).input_ids)
    ids = ids[: args.tokens]
    base = perplexity(fp32, ids, args.window, torch.device("cpu"))
    log(f"fp32 perplexity {base:.3f} on {ids.numel()} tokens")
    rows = [{"backend": "fp32", "bits": None, "group_size": None, "perplexity": base}]
    for bits, group in PAIRS:
        configs = [("hqq", {"quant_method": "hqq", "nbits": bits, "group_size": group})]
        if bits in (2, 4, 8):
            configs.append(
                ("rtn", {"quant_method": "rtn", "bits": bits, "group_size": group, "symmetric": False})
            )
        for backend, config in configs:
            model = copy.deepcopy(fp32)
            t0 = time.perf_counter()
            report = quantplug.quantize(model, config, progress=False)
            seconds = time.perf_counter() - t0
            ppl = perplexity(model, ids, args.window, torch.device("cpu"))
            row = {
                "backend": backend,
                "bits": bits,
                "group_size": group,
                "perplexity": ppl,
                "ppl_change_pct": (ppl / base - 1) * 100,
                "quantize_seconds": seconds,
                "converted": len(report.converted),
                "weight_MiB": report.bytes_after / 2**20,
            }
            rows.append(row)
            log(
                f"{backend} {bits}-bit g{group}: ppl {ppl:.3f} ({row['ppl_change_pct']:+.1f}%), {seconds:.1f} s"
            )
            del model
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "hqq_vs_rtn.json").write_text(
        json.dumps({"tokens": int(ids.numel()), "window": args.window, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# HQQ vs round-to-nearest (rtn, asymmetric) at the same bits and group size",
        "",
        f"SmolLM2-135M-Instruct (fp32, from its Q4_1 GGUF), perplexity on {ids.numel()} tokens of the "
        f"Python docs text (window {args.window}); fp32 {base:.3f}. Quantize time includes the whole "
        "model (210 layers) on a shared 2-core CPU.",
        "",
        "| bits | group | hqq ppl | rtn asym ppl | hqq quantize s | rtn quantize s |",
        "|---|---|---|---|---|---|",
    ]
    for bits, group in PAIRS:
        h = next(r for r in rows if r["backend"] == "hqq" and (r["bits"], r["group_size"]) == (bits, group))
        r = next(
            (r for r in rows if r["backend"] == "rtn" and (r["bits"], r["group_size"]) == (bits, group)), None
        )
        rtn_ppl = "–" if r is None else f"{r['perplexity']:.2f} ({r['ppl_change_pct']:+.1f}%)"
        rtn_s = "–" if r is None else f"{r['quantize_seconds']:.1f}"
        lines.append(
            f"| {bits} | {group} | {h['perplexity']:.2f} ({h['ppl_change_pct']:+.1f}%) | {rtn_ppl} | "
            f"{h['quantize_seconds']:.1f} | {rtn_s} |"
        )
    (args.out_dir / "hqq_vs_rtn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
