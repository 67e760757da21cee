"""The figures a plugin declares on its presets (``Preset.rel_error``, ``Preset.bits_per_weight``),
measured the way the declarations define them.

    python bench/preset_figures.py --backend compressed-tensors
    python bench/preset_figures.py --backend rtn --backend gptq

For each preset of each backend: one bias-free ``nn.Linear(2048, 2048)`` with bf16 weights drawn
N(0, 0.02) (seed 0) is quantized through ``quantplug.quantize`` (calibrating presets get 4 batches of
256 Gaussian rows), and run on 64 other Gaussian rows in bf16:

- rel_error       = ||quantized(x) - dense(x)|| / ||dense(x)||
- bits_per_weight = bytes of the tensors ``Quantizer.module_tensors`` reports for the layer x 8 /
                    (2048 x 2048), with the layer's dtype for its float tensors (scales in bf16)

Writes bench/results/preset_figures.json (merged per backend) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

import quantplug

RESULTS = Path(__file__).resolve().parent / "results" / "preset_figures.json"
SIZE = 2048


def measure(backend: quantplug.Backend, preset: quantplug.Preset) -> dict:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(SIZE, SIZE, bias=False)).to(torch.bfloat16)
    nn.init.normal_(dense[0].weight, std=0.02)
    model = nn.Sequential(nn.Linear(SIZE, SIZE, bias=False)).to(torch.bfloat16)
    model.load_state_dict(dense.state_dict())
    config = preset.build(backend.config)
    quantizer = quantplug.AutoQuantizer.from_config(config)
    calibration = None
    if quantizer.needs_calibration():
        generator = torch.Generator().manual_seed(1)
        calibration = [torch.randn(256, SIZE, generator=generator).to(torch.bfloat16) for _ in range(4)]
    start = time.perf_counter()
    quantplug.quantize(model, config, calibration_data=calibration, progress=False)
    seconds = time.perf_counter() - start
    x = torch.randn(64, SIZE, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        ref, out = dense(x).float(), model(x).float()
    tensors = quantizer.module_tensors("0", model[0])
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    return {
        "rel_error": round(((out - ref).norm() / ref.norm()).item(), 4),
        "bits_per_weight": round(stored * 8 / (SIZE * SIZE), 3),
        "quantize_s": round(seconds, 2),
        "layer": type(model[0]).__name__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", action="append", required=True, help="backend name (repeatable)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.backend:
        backend = quantplug.get_backend(name)
        rows = {}
        for preset in backend.presets:
            rows[preset.name] = measure(backend, preset)
            r = rows[preset.name]
            print(
                f"{name}:{preset.name:<14} rel_error {r['rel_error']:<7} bits/weight {r['bits_per_weight']:<7} "
                f"(declared {preset.rel_error} / {preset.bits_per_weight})  {r['quantize_s']} s  {r['layer']}"
            )
        results[name] = {
            "command": f"python bench/preset_figures.py --backend {name}",
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "plugin": f"{backend.plugin} {backend.plugin_version}",
            "date": time.strftime("%Y-%m-%d"),
            "presets": rows,
        }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
