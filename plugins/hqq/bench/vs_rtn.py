"""HQQ next to plain round-to-nearest (quantplug-rtn, asymmetric) at the same bits AND the same
group size, on the real SmolLM2-135M-Instruct that demo/prepare.py caches. Needs quantplug-rtn
installed (a benchmark, not a test).

bench/quality.py's rows use each backend's own presets (hqq: group 64; rtn: 128 symmetric and 32
asymmetric), and SmolLM2's weights come from a Q4_1 GGUF (4-bit, groups of 32,
asymmetric), which rtn's int4 g32 asym nearly reproduces. This script pairs the configs exactly.
Perplexity and quantize time come from ``quantplug.compare`` (its default text: the Python docs
topics of the standard library); its latency figures are not used here (one short run each).

    python plugins/hqq/bench/vs_rtn.py --out-dir bench/results/quality-hqq
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import quantplug

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "demo"))
import prepare  # noqa: E402  (demo/prepare.py: the same cached model)

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

    folder = prepare.smollm2_folder(REPO / "demo/.cache", log)
    candidates = []
    for bits, group in PAIRS:
        candidates.append({"quant_method": "hqq", "nbits": bits, "group_size": group})
        if bits in (2, 4, 8):
            candidates.append({"quant_method": "rtn", "bits": bits, "group_size": group, "symmetric": False})
    result = quantplug.compare(
        folder,
        candidates,
        device="cpu",
        tokens=args.tokens,
        window=args.window,
        prefill_tokens=2,
        decode_tokens=1,
        repeats=1,
        log=log,
    )
    base = result.baseline.perplexity
    n_tokens = result.settings["tokens"]
    rows = [{"backend": "fp32", "bits": None, "group_size": None, "perplexity": base}]
    for row in result.rows[1:]:
        if row.error:
            raise SystemExit(f"{row.label} failed: {row.error}")
        cfg = row.config
        rows.append(
            {
                "backend": row.backend,
                "bits": cfg.get("nbits", cfg.get("bits")),
                "group_size": cfg["group_size"],
                "perplexity": row.perplexity,
                "ppl_change_pct": (row.perplexity / base - 1) * 100,
                "quantize_seconds": row.quantize_seconds,
                "weight_MiB": row.weight_bytes / 2**20,
            }
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "hqq_vs_rtn.json").write_text(
        json.dumps({"tokens": n_tokens, "window": args.window, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# HQQ vs round-to-nearest (rtn, asymmetric) at the same bits and group size",
        "",
        f"SmolLM2-135M-Instruct (fp32, from its Q4_1 GGUF), perplexity on {n_tokens} tokens of the "
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
