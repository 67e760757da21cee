"""Where one decode token's time goes (issue 31 item 4: what is left against llama.cpp): torch's
profiler over greedy decode steps of SmolLM2-135M-Instruct in bfloat16, each preset's layers on the
kernel quantplug picks, after a 254-token prompt (llama_cpp.py's depth).

    .tox/integration/bin/python bench/decode_profile.py                  # the recorded run, alone
    .tox/integration/bin/python bench/decode_profile.py --presets rtn:int4-g32 --no-record

Reports, per preset: decode ms per token (``quantplug.measure.decode_ms``, unprofiled), the
profiled wall time per token, the sum of the ops' own CPU time (the rest of the wall time is Python
and dispatch), and the ops taking most of it. Writes bench/results/decode_profile.json and the
"decode_profile" section of bench/RESULTS.md. Run it alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_info, machine_line, now_iso, update_results_section, write_json  # noqa: E402

MODEL = HERE.parent / "demo" / ".cache" / "smollm2-135m-instruct-fp32"
PRESETS = ("bf16", "rtn:int8", "rtn:int4-g32")
DEPTH, STEPS, TOP = 254, 16, 8


def profile(label: str, threads: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from transformers import AutoModelForCausalLM

    import quantplug
    from quantplug.candidates import resolve
    from quantplug.measure import decode_ms

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
    if label != "bf16":
        quantplug.quantize(model, resolve(label).config, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (DEPTH,), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        decode_ms(model, ids, 4, cpu)
    decode = sorted(decode_ms(model, ids, STEPS, cpu) for _ in range(3))[1]
    with torch.no_grad():
        res = model(ids.unsqueeze(0), use_cache=True)
        cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(STEPS):
                res = model(nxt, use_cache=True, past_key_values=cache)
                cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            wall = (time.perf_counter() - t0) / STEPS * 1e3
    events = prof.key_averages()
    ops = sorted(
        ((e.key, e.self_cpu_time_total / STEPS / 1e3, e.count / STEPS) for e in events), key=lambda t: -t[1]
    )
    return {
        "decode_ms": decode,
        "profiled_wall_ms": wall,
        "ops_self_ms": sum(t[1] for t in ops),
        "top": [{"op": k, "ms": ms, "calls": calls} for k, ms, calls in ops[:TOP]],
    }


def _table(rows: dict) -> str:
    lines = [
        "| preset | decode ms/token | profiled ms/token | ops' own time | Python and dispatch | top ops (ms per token, calls) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        top = "; ".join(f"{t['op']} {t['ms']:.2f} ({t['calls']:.0f})" for t in r["top"][:6])
        lines.append(
            f"| {label} | {r['decode_ms']:.1f} | {r['profiled_wall_ms']:.1f} | {r['ops_self_ms']:.1f} | "
            f"{r['profiled_wall_ms'] - r['ops_self_ms']:.1f} | {top} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = {label: profile(label, args.threads) for label in args.presets}
    info = machine_info()
    table = _table(rows)
    print(table)
    if args.no_record:
        return
    write_json(HERE / "results" / "decode_profile.json", {"when": now_iso(), "machine": info, "rows": rows})
    update_results_section(
        "decode_profile",
        "## Where a decode token's time goes\n\n"
        f"`python bench/decode_profile.py` ({now_iso()[:10]}; {machine_line(info)}; {args.threads} threads). "
        f"SmolLM2-135M-Instruct in bfloat16, quantized layers on the kernel quantplug picks, {STEPS} greedy "
        f"steps after a {DEPTH}-token prompt under torch's profiler (which adds its own overhead to the wall "
        "time); the KV cache is Transformers' DynamicCache.\n\n" + table,
    )


if __name__ == "__main__":
    main()
