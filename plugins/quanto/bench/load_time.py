"""Load time of quanto checkpoints written by quantplug, on SmolLM2-135M-Instruct (CPU).

For each config: quantize the fp32 model (cached by demo/prepare.py in demo/.cache), save it, then in
a fresh process time (a) importing optimum-quanto through the plugin's quantizer module,
(b) ``quantplug.load(ckpt)``, and check the reloaded logits equal the saved model's. For
comparison, the same process times optimum-quanto's own reload path (``requantize`` into a
Transformers model built normally, as ``QuantizedModelForCausalLM.from_pretrained`` does).

    cd /work/main && HF_HUB_OFFLINE=1 /work/venv/bin/python plugins/quanto/bench/load_time.py \
        --out bench/results/quality-quanto/load_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
FP32 = ROOT / "demo" / ".cache" / "smollm2-135m-instruct-fp32"
CONFIGS = [
    ("int8", "float32", {"weights": "int8"}),
    ("int4", "float32", {"weights": "int4"}),
    ("int4", "bfloat16", {"weights": "int4"}),
    ("int8+act int8", "float32", {"weights": "int8", "activations": "int8"}),
]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, quantplug
t1 = time.perf_counter()
import quantplug_quanto.quantizer  # imports optimum.quanto
t2 = time.perf_counter()
from safetensors.torch import load_file, save_file
ckpt, ids_file, out_file = sys.argv[1:4]
ids = load_file(ids_file)["ids"]
t3 = time.perf_counter()
model = quantplug.load(ckpt, progress=False)
t4 = time.perf_counter()
with torch.no_grad():
    logits = model(ids).logits
ref = load_file(ids_file)["logits"]
# optimum-quanto's own path: a Transformers model built normally, then requantize
from optimum.quanto import quantization_map, requantize
import transformers
cfg = transformers.AutoConfig.from_pretrained(ckpt)
del cfg.quantization_config
t5 = time.perf_counter()
hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
state = {}
for f in sorted(__import__("pathlib").Path(ckpt).glob("*.safetensors")):
    state.update(load_file(f))
qmap = quantization_map(model)
state = {k: v for k, v in state.items() if not k.endswith(".quantize_output")}
requantize(hf, state, qmap, device=torch.device("cpu"))
t6 = time.perf_counter()
print(json.dumps({
    "import_torch_quantplug_s": round(t1 - t0, 2),
    "import_optimum_quanto_s": round(t2 - t1, 2),
    "quantplug_load_s": round(t4 - t3, 2),
    "identical_logits": bool(torch.equal(logits, ref)),
    "optimum_quanto_requantize_s": round(t6 - t5, 2),
}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    import quantplug

    if not FP32.exists():
        raise SystemExit(f"{FP32} missing: run python demo/prepare.py once to cache SmolLM2")
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    calib = [torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype, cfg in CONFIGS:
            model = quantplug.load(FP32, dtype=getattr(torch, dtype), progress=False)
            t = time.perf_counter()
            quantplug.quantize(
                model,
                {"quant_method": "quanto", **cfg},
                progress=False,
                calibration_data=calib if cfg.get("activations") else None,
            )
            quantize_s = time.perf_counter() - t
            with torch.no_grad():
                logits = model(ids).logits
            ckpt = Path(tmp) / f"ckpt-{len(rows)}"
            t = time.perf_counter()
            quantplug.save(model, ckpt)
            save_s = time.perf_counter() - t
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            save_file({"ids": ids, "logits": logits.contiguous()}, Path(tmp) / "ids.safetensors")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(CHILD),
                    str(ckpt),
                    str(Path(tmp) / "ids.safetensors"),
                    "x",
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=1200,
            )
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {
                "config": label,
                "model_dtype": dtype,
                "quantize_s": round(quantize_s, 2),
                "save_s": round(save_s, 2),
                "checkpoint_mib": round(size / 2**20, 1),
                **child,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model
    result = {
        "command": "cd /work/main && HF_HUB_OFFLINE=1 /work/venv/bin/python plugins/quanto/bench/load_time.py "
        "--out bench/results/quality-quanto/load_time.json",
        "model": "SmolLM2-135M-Instruct (demo/.cache fp32 copy), 210 Linear layers quantized, lm_head tied/kept",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), no GPU",
        "versions": {
            d: __import__("importlib.metadata").metadata.version(d)
            for d in ("torch", "transformers", "optimum-quanto", "quantplug", "quantplug-quanto")
        },
        "notes": "Each load runs in a fresh process; quantplug_load_s excludes imports (listed separately). "
        "optimum_quanto_requantize_s is optimum-quanto's own reload path on the same tensors (build a "
        "Transformers model with initialized weights, quantize it, load the state dict) for comparison. "
        "identical_logits: the reloaded model's logits equal the saved model's bit for bit.",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
