"""MoE decode and prefill on CPU: quantized experts (unfused into per-expert Linears) against the
unquantized model in float32 and bfloat16 (issue 29, item 6).

    python bench/moe.py                  # the recorded run (~10 min on 2 cores)
    python bench/moe.py --quick          # a smoke run on a tiny model, nothing recorded

The quantized variants are rtn's presets ``int8`` (per channel: torch's fused int8 kernel) and
``int4-g128`` (the fused int4 kernel) in bfloat16, and int8 with groups of 128 (no fused kernel:
dequantized on every forward). The model is a random-weight Qwen3-MoE built here (no hub): 4 layers, hidden 1024, 32 experts of
intermediate 768, top-4, vocab 8192; experts hold 93% of its 0.33 B weights. Each variant runs in a
fresh child process: build the model (same seed), convert it, then prefill = one forward of 256
tokens and decode = ``generate`` of 32 tokens after a 16-token prompt with the KV cache, greedy,
median of ``--repeats`` timed runs after one warm-up. The unquantized model runs Transformers'
default experts implementation (``grouped_mm``) and, as a second row, ``eager`` (the per-expert
loop the unfused model also runs). Run it alone: a second busy process on 2 cores ruins timing.
Writes bench/results/moe.json and the "moe" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

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

SIZES = {
    "full": dict(
        hidden_size=1024,
        moe_intermediate_size=768,
        num_experts=32,
        num_experts_per_tok=4,
        num_hidden_layers=4,
        vocab_size=8192,
    ),
    "quick": dict(
        hidden_size=256,
        moe_intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        vocab_size=1024,
    ),
}
VARIANTS = {
    "fp32": (None, "float32", None),
    "fp32-eager": (None, "float32", "eager"),
    "bf16": (None, "bfloat16", None),
    "bf16-eager": (None, "bfloat16", "eager"),
    "rtn:int8 bf16": ({"quant_method": "rtn", "bits": 8, "group_size": -1}, "bfloat16", None),
    "rtn:int4-g128 bf16": ({"quant_method": "rtn", "bits": 4, "group_size": 128}, "bfloat16", None),
    "rtn:int8-g128 bf16": ({"quant_method": "rtn", "bits": 8, "group_size": 128}, "bfloat16", None),
}


def build(size: str, dtype: str, experts_impl: str | None):
    import torch

    from quantplug.testing_models import tiny_moe

    kw = dict(SIZES[size])
    sizes = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=512)
    model = tiny_moe("qwen3_moe", intermediate_size=kw["moe_intermediate_size"], **sizes, **kw)
    model = model.to(getattr(torch, dtype)).eval()
    if experts_impl:
        model.set_experts_implementation(experts_impl)
    return model


def child(size: str, variant: str, repeats: int) -> None:
    import torch

    import quantplug
    from quantplug.footprint import model_bytes

    config, dtype, impl = VARIANTS[variant]
    torch.set_num_threads(torch.get_num_threads())
    model = build(size, dtype, impl)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    report = quantplug.quantize(model, config, progress=False) if config else None
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, vocab, (1, 16), generator=gen)
    long = torch.randint(0, vocab, (1, 256), generator=gen)
    new = 32

    def decode() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert out.shape[1] == 16 + new
        return (time.perf_counter() - t0) / new * 1e3

    def prefill() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(long)
        return (time.perf_counter() - t0) * 1e3

    decode(), prefill()  # warm-up
    decodes = [decode() for _ in range(repeats)]
    prefills = [prefill() for _ in range(repeats)]
    emit_result(
        {
            "variant": variant,
            "decode_ms_per_token": statistics.median(decodes),
            "decode_runs": decodes,
            "prefill_ms": statistics.median(prefills),
            "prefill_runs": prefills,
            "model_bytes": model_bytes(model),
            "fp32_bytes": fp32_bytes,
            "converted": len(report.converted) if report else 0,
            "threads": torch.get_num_threads(),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "VARIANT"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.repeats)
        return
    size = "quick" if args.quick else "full"
    rows = []
    for variant in VARIANTS:
        print(f"{variant} ...", flush=True)
        rows.append(
            run_child([__file__, "--child", size, variant, "--repeats", str(args.repeats)], timeout=3600)
        )
        r = rows[-1]
        print(
            f"  decode {r['decode_ms_per_token']:.1f} ms/token, prefill {r['prefill_ms']:.0f} ms", flush=True
        )
    by = {r["variant"]: r for r in rows}
    info = machine_info(("torch", "transformers", "quantplug", "quantplug-rtn"))
    lines = [
        f"{now_iso()[:10]}, {machine_line(info)}, torch {info['versions']['torch']}, transformers "
        f"{info['versions']['transformers']}, git {info['git_revision']}; `python bench/moe.py`"
        + (" --quick" if args.quick else ""),
        "",
        f"Random Qwen3-MoE ({SIZES[size]}), each variant in a fresh process, median of {args.repeats}: decode = "
        "ms per new token of a 32-token greedy `generate` after 16 prompt tokens; prefill = one 256-token forward.",
        "",
        "| variant | model MB | of fp32 | layers converted | decode ms/token | vs fp32 / bf16 / bf16-eager | prefill 256 ms | vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["decode_ms_per_token"]
        ratios = " / ".join(
            f"{by[b]['decode_ms_per_token'] / d:.2f}x" for b in ("fp32", "bf16", "bf16-eager")
        )
        lines.append(
            f"| {r['variant']} | {r['model_bytes'] / 1e6:.0f} | {r['model_bytes'] / r['fp32_bytes']:.2f} | "
            f"{r['converted']} | {d:.1f} | {ratios} | {r['prefill_ms']:.0f} | "
            f"{by['bf16']['prefill_ms'] / r['prefill_ms']:.2f}x |"
        )
    body = (
        "## MoE decode and prefill on CPU: unfused quantized experts vs the unquantized model (issue 29)\n\n"
    )
    body += "\n".join(lines)
    print(body)
    if not args.quick:
        write_json(HERE / "results" / "moe.json", {"machine": info, "size": SIZES[size], "rows": rows})
        update_results_section("moe", body)


if __name__ == "__main__":
    main()
