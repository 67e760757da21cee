"""Issue 19's checks on a GPU, for a session that is lent one (they run on the CPU too, as a smoke test).

- LoRA through PEFT on CUDA: the conformance kit's ``check_lora`` (train 12 steps, only the
  adapters change, the adapter reloads on ``quantplug.load``) for the presets users fine-tune with.
- Placement: an rtn checkpoint loaded with ``device_map`` spread over the GPU, CPU memory and disk
  gives the logits of a load onto the GPU alone; an "auto" plan within a GPU budget too small for
  the model; and a bitsandbytes layer offloaded to CPU memory is refused with the layer named.

Each check is recorded with its result or its error; none stops the others.

    python bench/gpu_checks.py --out /tmp/gpu_checks.json            # on the GPU machine
    python bench/gpu_checks.py --device cpu --out /tmp/checks.json   # the smoke test here
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LORA_PRESETS = ["bitsandbytes:nf4", "bitsandbytes:int8", "hqq:4bit-g64", "torchao:int8-weight-only"]


def check(results: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as exc:
        results[name] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:600],
            "trace": traceback.format_exc()[-1500:],
        }
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {'ok' if results[name]['ok'] else results[name]['error']}", file=sys.stderr, flush=True)


def lora(spec: str, device: str) -> dict:
    from quantplug.candidates import resolve
    from quantplug.lora_check import check_lora

    with tempfile.TemporaryDirectory() as tmp:
        out = check_lora(resolve(spec).config, tmp, device=device)
    return {"losses": [round(x, 4) for x in out["losses"]], "lora_layer": out["lora_layer"].__name__,
            "reload_max_diff": out["reload_max_diff"]}  # fmt: skip


def placement(device: str) -> dict:
    import torch

    import quantplug
    from quantplug.testing import logits, tiny_llama, token_ids

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_llama(num_hidden_layers=4).to(torch.bfloat16)
        quantplug.quantize(model, {"quant_method": "rtn", "bits": 4, "group_size": 32}, progress=False)
        folder = quantplug.save(model, tmp / "ckpt")
        ids = token_ids().to(device)
        ref = logits(quantplug.load(folder, device=device, progress=False), ids)
        spread = {"": device, "model.layers.1": "cpu", "model.layers.2": "disk", "lm_head": "cpu"}
        got = quantplug.load(folder, device_map=spread, offload_folder=tmp / "off", progress=False)
        same = torch.equal(logits(got, ids), ref)
        whole = sum(
            t.numel() * t.element_size() for t in quantplug.load(folder, progress=False).state_dict().values()
        )
        budget = {device if device == "cpu" else 0: int(whole * 0.6), "cpu": int(whole * 0.3)} if device != "cpu" else {"cpu": int(whole * 0.75)}  # fmt: skip
        auto = quantplug.load(
            folder, device_map="auto", max_memory=budget, offload_folder=tmp / "off2", progress=False
        )
        auto_same = torch.equal(logits(auto, ids), ref)
    assert same and auto_same, f"dict map equal: {same}, auto map equal: {auto_same}"
    return {"dict_map": got.hf_device_map, "auto_map": auto.hf_device_map, "logits_equal": True}


def bnb_refused(device: str) -> dict:
    import quantplug
    from quantplug.testing import tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama().to(device)
        quantplug.quantize(model, {"quant_method": "bitsandbytes", "load_in_4bit": True}, progress=False)
        folder = quantplug.save(model, Path(tmp) / "ckpt")
        where = "cpu" if device != "cpu" else "disk"
        try:
            quantplug.load(
                folder, device_map={"": device, "model.layers.1": where}, offload_folder=Path(tmp) / "o"
            )
        except quantplug.ConfigError as exc:
            assert "model.layers.1." in str(exc) and "'bitsandbytes'" in str(exc), str(exc)
            return {"refused": str(exc)[:300]}
    raise AssertionError("a bitsandbytes layer offloaded was not refused")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lora", default=",".join(LORA_PRESETS), help="comma list of backend:preset")
    args = ap.parse_args()
    import torch

    results: dict = {"device": args.device, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip
    for spec in filter(None, args.lora.split(",")):
        check(results, f"lora {spec}", lambda spec=spec: lora(spec, args.device))
    check(results, "placement rtn", lambda: placement(args.device))
    check(results, "placement bitsandbytes refused", lambda: bnb_refused(args.device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0 if all(v.get("ok") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
