"""Placement with accelerate (``quantplug.load(..., device_map=)``) on SmolLM2-135M, CPU only:
peak memory and decode speed of a model partly offloaded to disk against the same checkpoint
loaded whole.

    python bench/placement.py             # records bench/results/placement.json and RESULTS.md
    python bench/placement.py --fraction 0.3

The checkpoint: SmolLM2-135M-Instruct (``demo/prepare.py``) quantized with rtn:int8 in bfloat16
(torch's fused int8 kernel), saved once under --cache-dir. Each mode runs in a fresh process
that reports its own peak RSS (``VmHWM``) and the bytes of tensors it holds in memory:

  import    import torch, transformers and quantplug, read the config and resolve the model class (the
            fixed cost of every mode: Transformers imports its model modules on first use)
  resident  quantplug.load(ckpt): everything in CPU memory
  offload   quantplug.load(ckpt, device_map="auto", max_memory={"cpu": fraction x model bytes},
            offload_folder=...): accelerate's plan, the rest on disk
  qol       quantize-on-load from the fp32 folder with the same device_map and budget

Each then decodes --decode tokens greedily (ms/token, median of 3 runs) and checks its first 8
generated tokens equal the resident load's. Run it alone: timing needs an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "demo"))
import _common as common  # noqa: E402

CONFIG = {"quant_method": "rtn", "bits": 8, "group_size": -1, "symmetric": True}
MODES = ("import", "resident", "offload", "qol")


def checkpoint(cache: Path) -> tuple[Path, Path]:
    """(the fp32 SmolLM2 folder, its rtn:int8 bf16 checkpoint), made once."""
    import prepare
    import torch

    import quantplug

    fp32 = prepare.smollm2_folder()
    ckpt = cache / "smollm2-rtn-int8-bf16"
    if not (ckpt / "config.json").exists():
        model = quantplug.load(fp32, dtype=torch.bfloat16, progress=False)
        quantplug.quantize(model, CONFIG, progress=False)
        quantplug.save(model, ckpt)
    return fp32, ckpt


def vm_hwm() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: that keeps the forking
    parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(mode: str, fp32: Path, ckpt: Path, fraction: float, offload: Path, decode: int) -> dict:
    import torch

    import quantplug

    t0 = time.perf_counter()
    budget = None
    if mode == "import":  # and what the first load imports lazily (Transformers' model and config modules)
        import transformers

        transformers.AutoConfig.from_pretrained(ckpt)
        assert transformers.LlamaForCausalLM is not None
        return {"peak_rss": vm_hwm()}
    if mode == "resident":
        model = quantplug.load(ckpt, progress=False)
    else:
        whole = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        budget = int(whole * fraction)
        kw = {
            "device_map": "auto",
            "max_memory": {"cpu": budget},
            "offload_folder": offload,
            "progress": False,
        }
        if mode == "offload":
            model = quantplug.load(ckpt, **kw)
        else:
            model = quantplug.load(fp32, config=CONFIG, dtype=torch.bfloat16, **kw)
    load_s = time.perf_counter() - t0
    peak_load = vm_hwm()
    held = sum(
        t.numel() * t.element_size()
        for t in [*model.parameters(), *model.buffers()]
        if t.device.type != "meta"
    )
    ids = torch.tensor([[1, 504, 3287, 314, 253, 1345, 28, 3767]])
    times, tokens = [], None
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
            times.append((time.perf_counter() - t) * 1000 / decode)
            tokens = out[0, ids.shape[1] : ids.shape[1] + 8].tolist()
    placed = getattr(model, "hf_device_map", None) or {"": "cpu"}
    return {
        "load_s": round(load_s, 2),
        "peak_rss_after_load": peak_load,
        "peak_rss": vm_hwm(),
        "tensor_bytes_in_memory": held,
        "budget": budget,
        "on_disk": sorted(k for k, v in placed.items() if v == "disk"),
        "ms_per_token": round(sorted(times)[1], 1),
        "first_tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--fraction", type=float, default=0.5, help="CPU budget as a share of the checkpoint bytes"
    )
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=HERE.parent / "demo" / ".cache")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        fp32, ckpt = checkpoint(args.cache_dir)
        res = child(
            args.child, fp32, ckpt, args.fraction, args.cache_dir / f"offload-{args.child}", args.decode
        )
        print("RESULT " + json.dumps(res))
        return
    checkpoint(args.cache_dir)  # made outside the measured processes
    results = {}
    for mode in MODES:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--fraction", str(args.fraction), "--decode", str(args.decode),
             "--threads", str(args.threads), "--cache-dir", str(args.cache_dir)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        results[mode] = json.loads(line[7:]) if line else {"error": proc.stderr[-800:]}
        print(mode, results[mode], file=sys.stderr, flush=True)
    info = common.machine_info(["torch", "transformers", "accelerate"])
    common.write_json(
        HERE / "results" / "placement.json",
        {"results": results, "machine": info, "args": vars(args) | {"cache_dir": str(args.cache_dir)}},
    )
    base = results["import"].get("peak_rss", 0)
    ref = results["resident"].get("first_tokens")
    lines = [
        "| mode | CPU budget | modules on disk | tensors in memory | peak RSS above import: load | and decode | load s | decode ms/token | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES[1:]:
        r = results[mode]
        if "error" in r:
            lines.append(f"| {mode} | failed: {r['error'].splitlines()[-1][:100]} | | | | | | | |")
            continue
        budget = f"{r['budget'] / 2**20:.0f} MiB" if r["budget"] else "-"
        lines.append(
            f"| {mode} | {budget} | {len(r['on_disk'])} | {r['tensor_bytes_in_memory'] / 2**20:.0f} MiB | "
            f"{(r['peak_rss_after_load'] - base) / 2**20:.0f} MiB | {(r['peak_rss'] - base) / 2**20:.0f} MiB | {r['load_s']} | {r['ms_per_token']} | {r['first_tokens'] == ref} |"
        )
    body = "\n".join(
        [
            "## Placement: SmolLM2-135M rtn:int8 partly offloaded to disk (accelerate device_map)",
            "",
            f"{common.now_iso()} · `python bench/placement.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` · "
            f"{common.machine_line(info)}",
            "",
            *lines,
            "",
            "resident: `quantplug.load(ckpt)`; offload: `device_map='auto'` with `max_memory={'cpu': budget}` and the "
            "rest on disk; qol: quantize-on-load from the fp32 folder with the same plan. Peak RSS is the process's "
            "maximum resident set (VmHWM) minus the import-only process's, after loading and after decoding. While "
            "decoding, accelerate's hooks copy each offloaded block in from its memory-mapped file for every "
            "forward; the allocator keeps some of those copies, so the decode peak of an offloaded model depends "
            "on the allocator's state (here 487 to 612 MiB in separate runs of the same load). Decode: greedy, "
            "median of 3 runs.",
        ]
    )
    common.update_results_section("placement", body)
    print(body)


if __name__ == "__main__":
    main()
