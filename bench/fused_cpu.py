"""Layer-level latency of the core's fused CPU kernels (``quantplug.KernelLinear`` on torch's
``torch-int8-cpu`` / ``torch-int4-cpu``, here holding rtn layers) against dense float32 / bfloat16,
per number of input rows M: where the kernels win (decode, few rows) and where the dense matmul does
(prefill), i.e. the crossover the kernels' ``dense_from`` (and ``RtnConfig.dense_from``) is set from.

    python bench/fused_cpu.py                      # SmolLM2-135M's layer shapes
    python bench/fused_cpu.py --shape 4096x4096    # others (out x in), repeatable

For each shape and M: float32 F.linear, bfloat16 F.linear, and rtn int8 (per channel) / int4 (g32)
layers quantized by quantplug (a ``KernelLinear``) forced onto the kernel and onto the dense path
(dequantize + bfloat16 matmul) through ``dense_from``,
median of timed calls on hot caches, with torch's threads as set. Run it alone: a second busy
process on a 2-core machine makes every figure meaningless. Writes bench/results/fused_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import quantplug
from quantplug.hardware import cpu_hardware
from quantplug_rtn import RtnConfig

OUT = Path(__file__).parent / "results" / "fused_cpu.json"
SMOLLM2 = ["576x576", "192x576", "1536x576", "576x1536"]
ROWS = [1, 2, 4, 8, 16, 32, 64, 256]
KERNELS = ("torch-int8-cpu", "torch-int4-cpu")


def _median_us(fn, budget_s: float = 0.25) -> float:
    for _ in range(3):
        fn()
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < budget_s or len(samples) < 5:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _layer(out_f: int, in_f: int, bits: int, group: int, dense_from: int) -> quantplug.KernelLinear:
    """One bfloat16 layer quantized by rtn, as the core runs it (a ``KernelLinear``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16))
    quantplug.quantize(model, RtnConfig(bits=bits, group_size=group, dense_from=dense_from), progress=False)
    if not isinstance(model[0], quantplug.KernelLinear):
        raise SystemExit(
            f"{out_f}x{in_f} int{bits}: no kernel runs it ({quantplug.kernel_choices(model)['0']})"
        )
    return model[0]


def bench_shape(shape: str) -> list[dict]:
    out_f, in_f = (int(v) for v in shape.split("x"))
    w32 = torch.randn(out_f, in_f) * 0.02
    w16 = w32.to(torch.bfloat16)
    kernels = {
        "int8 kernel": _layer(out_f, in_f, 8, -1, 10**9),
        "int8 dense": _layer(out_f, in_f, 8, -1, 1),
        "int4-g32 kernel": _layer(out_f, in_f, 4, 32, 10**9),
        "int4-g32 dense": _layer(out_f, in_f, 4, 32, 1),
    }
    rows = []
    with torch.no_grad():
        for m in ROWS:
            x32 = torch.randn(m, in_f)
            x16 = x32.to(torch.bfloat16)
            row = {
                "shape": shape,
                "M": m,
                "fp32 F.linear": _median_us(lambda x32=x32: F.linear(x32, w32)),
                "bf16 F.linear": _median_us(lambda x16=x16: F.linear(x16, w16)),
            }
            for name, layer in kernels.items():
                row[name] = _median_us(lambda layer=layer, x16=x16: layer(x16))
            rows.append(row)
            print(
                " ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="out x in, e.g. 4096x4096 (default: SmolLM2's)")
    args = parser.parse_args()
    kernels = quantplug.available_kernels()
    problems = {k: kernels[k].machine_problem() for k in KERNELS}
    if any(problems.values()):
        raise SystemExit(f"no fused kernels on this machine: {problems}")
    results = [r for shape in args.shape or SMOLLM2 for r in bench_shape(shape)]
    OUT.write_text(
        json.dumps(
            {
                "machine": cpu_hardware().name or platform.processor(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "unit": "microseconds per call, median",
                "rows": results,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
