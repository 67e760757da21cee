"""Quantization time per layer of quantplug-hqq on this machine (HQQ's optimizer is the slow part).

Quantizes ``--layers`` random Linear(``--size``, ``--size``) layers (N(0, 0.02) weights, fp32) at
each bit width through ``quantplug.AutoQuantizer`` (what ``quantplug.quantize`` runs per layer),
after one warm-up layer, and records the median seconds per layer and the layer's relative output
error. Writes ``quantize_time.json`` and ``quantize_time.md`` to ``--out-dir``.

    python plugins/hqq/bench/quantize_time.py --out-dir bench/results/quality-hqq
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import quantplug


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="*", default=[8, 4, 3, 2, 1])
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/quality-hqq"))
    args = ap.parse_args()

    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layer = torch.nn.Linear(args.size, args.size)
        torch.nn.init.normal_(layer.weight, std=0.02)
        layers.append(layer)
    x = torch.randn(8, args.size)
    rows = []
    with torch.no_grad():
        refs = [layer(x) for layer in layers]
        for bits in args.bits:
            quantizer = quantplug.AutoQuantizer.from_config(
                {"quant_method": "hqq", "nbits": bits, "group_size": args.group_size}
            )
            quantizer.quantize_module("warmup", layers[0])
            times, errors = [], []
            for i, (layer, ref) in enumerate(zip(layers, refs)):
                t0 = time.perf_counter()
                q = quantizer.quantize_module(f"layer{i}", layer)
                times.append(time.perf_counter() - t0)
                errors.append(((q(x) - ref).norm() / ref.norm()).item())
            rows.append(
                {
                    "nbits": bits,
                    "group_size": args.group_size,
                    "seconds_per_layer_median": statistics.median(times),
                    "seconds_all_layers": sum(times),
                    "rel_error_mean": statistics.mean(errors),
                }
            )
            print(
                f"{bits}-bit: {statistics.median(times):.2f} s/layer, {sum(times):.2f} s for "
                f"{args.layers} layers, rel. error {statistics.mean(errors):.4f}",
                flush=True,
            )
    result = {
        "layer": f"Linear({args.size}, {args.size}), fp32, N(0, 0.02) weights",
        "layers": args.layers,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "quantize_time.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# quantplug-hqq quantize time: {args.layers} x {result['layer']}",
        "",
        result["machine"],
        "",
        "| nbits | group | s / layer (median) | s, all layers | rel. output error |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['nbits']} | {r['group_size']} | {r['seconds_per_layer_median']:.2f} | "
        f"{r['seconds_all_layers']:.2f} | {r['rel_error_mean']:.4f} |"
        for r in rows
    ]
    (args.out_dir / "quantize_time.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
