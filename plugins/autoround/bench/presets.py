"""The figures the presets and Capabilities.max_rel_error declare, measured through quantplug.

    python plugins/autoround/bench/presets.py            # every preset, then the kit's layer per bit width

Preset figures: one float32 Linear(2048, 2048) (no bias) with N(0, 1) weights, calibrated on 4
batches of 32 Gaussian input rows and evaluated on 64 other rows; bits per weight = bytes of the
stored tensors (qweight, qzeros, scales) x 8 / weights. max_rel_error: the conformance kit's
Linear(512, 256) with N(0, 0.02) weights, same inputs as the kit, at the config's default iters.
"""

from __future__ import annotations

import json
import logging
import time

import torch

import quantplug


def measure(config: dict, in_f: int, out_f: int, std: float, bias: bool) -> dict:
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_f, out_f, bias=bias)
    torch.nn.init.normal_(layer.weight, std=std)
    gen = torch.Generator().manual_seed(7)
    calib = [torch.randn(32, in_f, generator=gen) for _ in range(4)]
    x = torch.randn(64, in_f, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = layer(x)
    model = torch.nn.Sequential(layer)
    t0 = time.perf_counter()
    report = quantplug.quantize(
        model, {"quant_method": "auto-round", **config}, progress=False, calibration_data=calib
    )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = model(x)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    stored = report.bytes_after - (out_f * 2 if bias else 0)  # bias is stored as float16
    return {
        "config": config,
        "rel_error": round(rel, 4),
        "bits_per_weight": round(8 * stored / (in_f * out_f), 4),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    logging.disable(logging.WARNING)
    from quantplug_autoround import PRESETS

    for preset in PRESETS:
        print(
            json.dumps({"preset": preset.name, **measure(dict(preset.config), 2048, 2048, 1.0, False)}),
            flush=True,
        )
    for bits in (2, 3, 4, 8):
        for group in (128, 64, 32):
            print(
                json.dumps(
                    {"kit_layer": True, **measure({"bits": bits, "group_size": group}, 512, 256, 0.02, True)}
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
