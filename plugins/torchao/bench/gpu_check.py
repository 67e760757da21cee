"""GPU check for quantplug-torchao: every mode, including the CUDA-only ones, on a tiny model.

    python plugins/torchao/bench/gpu_check.py [--out results.json]

For each mode (int8 weight-only / dynamic, intx 4-bit, float8 weight-only, int4 weight-only
(tile_packed_to_4d), float8 dynamic per-tensor and per-row) on a random-weight tiny Llama in bf16 on
``cuda``: the one-layer error against the declared ``Capabilities.max_rel_error``, quantize, logit
error, greedy generation, save -> load onto ``cuda`` with identical logits. A mode the plugin refuses
on this GPU (float8 dynamic below compute capability 8.9) must be refused up front, and only then.

Prints one line per mode and writes JSON (default ``$OUT/torchao_gpu_check.json`` when ``$OUT`` is
set, else ``./torchao_gpu_check.json``). Without CUDA it prints ``SKIP`` and exits 0. Exit status 1
when any mode failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODES = [
    ("int8_weight_only", {}),
    ("int8_dynamic_activation_int8_weight", {}),
    ("intx_weight_only", {"bits": 4, "group_size": 32}),
    ("float8_weight_only", {}),
    ("int4_weight_only", {"group_size": 128, "int4_packing_format": "tile_packed_to_4d"}),
    ("float8_dynamic_activation_float8_weight", {"float8_granularity": "tensor"}),
    ("float8_dynamic_activation_float8_weight", {"float8_granularity": "row"}),
]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_mode(mode: str, kwargs: dict, workdir: Path) -> dict:
    import torch

    import quantplug
    from quantplug.testing import tiny_llama
    from quantplug_torchao import TorchaoConfig

    row: dict = {"mode": mode, "settings": kwargs}
    config = TorchaoConfig.from_mode(mode, **kwargs)
    backend = quantplug.get_backend("torchao")
    cap = torch.cuda.get_device_capability()
    expect_refusal = mode == "float8_dynamic_activation_float8_weight" and cap < (8, 9)
    quantizer = quantplug.AutoQuantizer.from_config(config)
    try:
        quantizer.validate_environment("cuda")
    except quantplug.BackendUnavailableError as exc:
        row.update(status="refused" if expect_refusal else "FAIL", detail=str(exc))
        return row
    if expect_refusal:
        row.update(status="FAIL", detail=f"accepted on compute capability {cap}, which should be refused")
        return row

    # one layer, as the conformance kit measures it
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=0.02)
    x = torch.randn(32, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x)
        q = quantizer.quantize_module("layer", layer)
        layer_err = _rel(q(x), ref)
    bound = backend.capabilities.max_rel_error[config.weight_bits]
    stored = quantizer.module_tensors("layer", q)
    row.update(
        weight_type=type(q.weight).__name__,
        layer_rel_error=round(layer_err, 5),
        declared_bound=bound,
        stored_bits_per_weight=round(
            8 * sum(t.numel() * t.element_size() for k, t in stored.items() if k != "bias") / (512 * 256), 3
        ),
        stored_tensors={k: [list(t.shape), str(t.dtype)] for k, t in stored.items()},
    )

    # a tiny model: quantize, generate, save, load onto cuda
    model = tiny_llama().to("cuda", torch.bfloat16)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)
    ).cuda()
    with torch.no_grad():
        ref_logits = model(ids).logits
    t0 = time.perf_counter()
    report = quantplug.quantize(model, config, progress=False)
    row["quantize_s"] = round(time.perf_counter() - t0, 3)
    row["converted"], row["skipped"] = len(report.converted), report.skipped
    with torch.no_grad():
        out = model(ids).logits
        gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    row["logit_rel_error"] = round(_rel(out, ref_logits), 5)
    row["generated_shape"] = list(gen.shape)
    ckpt = quantplug.save(model, workdir / mode / json.dumps(kwargs, sort_keys=True).replace('"', "")[:60])
    loaded = quantplug.load(ckpt, device="cuda", progress=False)
    with torch.no_grad():
        again = loaded(ids).logits
    row["reload_identical"] = bool(torch.equal(again, out))
    # cuBLAS / torchao kernels may pick another algorithm for the reloaded tensors' layout: equal
    # up to bf16 rounding is a correct reload; a wrong tensor would differ by the quantization error.
    row["reload_rel_diff"] = round(_rel(again, out), 6)
    row["reload_max_abs_diff"] = float((again.float() - out.float()).abs().max())
    ok = (
        layer_err <= bound
        and torch.isfinite(out).all().item()
        and row["reload_rel_diff"] <= 1e-2
        and tuple(gen.shape) == (1, 7)
        and report.converted
    )
    row["status"] = "ok" if ok else "FAIL"
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path.cwd()
    ap.add_argument("--out", type=Path, default=default_dir / "torchao_gpu_check.json")
    args = ap.parse_args()

    import torch

    result: dict = {"python": platform.python_version(), "torch": torch.__version__}
    if not torch.cuda.is_available():
        result.update(skipped=True, reason="no CUDA device (torch.cuda.is_available() is False)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"SKIP: {result['reason']}; nothing to check. Wrote {args.out}")
        return 0

    import torchao

    import quantplug

    result.update(
        skipped=False,
        torchao=torchao.__version__,
        quantplug=quantplug.__version__,
        gpu=torch.cuda.get_device_name(),
        compute_capability=list(torch.cuda.get_device_capability()),
        modes=[],
    )
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for mode, kwargs in MODES:
            try:
                row = check_mode(mode, kwargs, Path(tmp))
            except Exception as exc:  # record and go on: one broken mode must not hide the others
                row = {
                    "mode": mode,
                    "settings": kwargs,
                    "status": "FAIL",
                    "detail": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            failed += row["status"] == "FAIL"
            result["modes"].append(row)
            extra = (
                f"layer err {row.get('layer_rel_error')} (bound {row.get('declared_bound')}), "
                f"logit err {row.get('logit_rel_error')}, reload identical {row.get('reload_identical')}, "
                f"{row.get('weight_type')}"
                if row["status"] == "ok"
                else row.get("detail", "")
            )
            print(f"{row['status']:8s} {mode} {kwargs}: {extra}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{len(MODES) - failed}/{len(MODES)} modes ok or refused as expected. Wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
