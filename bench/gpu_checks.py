"""Issue 19's checks on a GPU, for a session that is lent one (they run on the CPU too, as a smoke test).

- LoRA through PEFT on CUDA: the conformance kit's ``check_lora`` (train 12 steps, only the
  adapters change, the adapter reloads on ``quantplug.load``) for the presets users fine-tune with.
- Placement: an rtn checkpoint loaded with ``device_map`` spread over the GPU, CPU memory and disk
  gives the logits of a load onto the GPU alone; an "auto" plan within a GPU budget too small for
  the model; and a bitsandbytes layer offloaded to CPU memory is refused with the layer named.

- quantplug-gpu-formats (``spqr``, ``higgs``, ``eetq``): quantplug refuses SpQR and HIGGS on the
  GPU too, with the route to Transformers; Transformers loads each method on CUDA with the real
  library (where it is installed: otherwise the check says "skipped" and why), compared with a dense
  reference (SpQR: spqr-quant's own ``dequantize``; HIGGS: the float model) and, for EETQ, with
  quantplug's eetq (codes and scales bit for bit against EETQ's ``quant_weights``, logits close).

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


def _gf_missing(*modules: str) -> str | None:
    """Why a gpu_formats check cannot run here (a module missing, or no CUDA), or None."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def _gf_tiny(folder: Path, dtype, **overrides) -> Path:
    """A tiny random Llama saved in full precision (``dtype``) in ``folder``."""
    from quantplug.testing import tiny_llama

    tiny_llama(**overrides).to(dtype).save_pretrained(folder)
    return folder


def _gf_refused_on(device: str, folder: Path) -> str:
    """quantplug's refusal of the pre-quantized checkpoint in ``folder`` on ``device``."""
    import quantplug

    try:
        quantplug.load(folder, device=device, progress=False)
    except quantplug.BackendUnavailableError as exc:
        assert "What to do:" in str(exc) and "from_pretrained(" in str(exc), str(exc)
        return str(exc)[:200]
    raise AssertionError(f"quantplug loaded {folder} on {device}")


def _gf_rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _spqr_layer(m: int, n: int, gen):
    """A random 3-bit 16x16 SpQR layer built by spqr-quant itself (no outliers, no permutation)."""
    import torch
    from spqr_quant.inference import ModelArgs, QuantizedLinear, SparseStorageConfiguration, SPQRLegacy

    tiles, groups = (m // 16) * (n // 16), m * n // 16
    codes = lambda k: torch.randint(0, 8, (k,), generator=gen, dtype=torch.int8)  # noqa: E731
    half = lambda v, k: torch.full((k,), v, dtype=torch.float16)  # noqa: E731
    legacy = SPQRLegacy(m, n, 3, codes(m * n).reshape(m, n), 16, 16, codes(groups), codes(groups),
                        half(0.002, tiles), half(-1.0, tiles), half(1.0, tiles), half(0.0, tiles),
                        torch.zeros(m + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int16),
                        torch.zeros(0, dtype=torch.float16), torch.arange(n))  # fmt: skip
    args = ModelArgs(3, 16, 16, SparseStorageConfiguration.CSR)
    return QuantizedLinear.from_legacy(legacy, args, "cpu")


def spqr_check(device: str) -> dict:
    """Transformers loads a SpQR checkpoint made of spqr-quant's own layers on CUDA, with the logits
    of the dense model holding spqr-quant's ``dequantize()`` (its host reference, the one a future
    quantplug reader must match); quantplug refuses it on the GPU and the CPU with the route."""
    import torch
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = _gf_tiny(Path(tmp) / "spqr", torch.float16)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "spqr",
            "bits": 3,
            "beta1": 16,
            "beta2": 16,
            "shapes": {},
        }
        (folder / "config.json").write_text(json.dumps(config))
        out = {
            "quantplug_cpu": _gf_refused_on("cpu", folder),
            "quantplug_gpu": _gf_refused_on(device, folder),
        }
        why = _gf_missing("spqr_quant")
        if why:
            return {**out, "skipped": f"Transformers' SpQR path: {why}"}
        import spqr_quant
        from transformers import AutoModelForCausalLM

        if not hasattr(spqr_quant.QuantizedLinear, "create_placeholder"):  # Transformers 5.25's spelling
            spqr_quant.QuantizedLinear.create_placeholder = spqr_quant.QuantizedLinear.create_placehodler
            out["aliased_create_placeholder"] = True
        tensors, dense, shapes, gen = (
            load_file(folder / "model.safetensors"),
            {},
            {},
            torch.Generator().manual_seed(0),
        )
        for key in [k for k in tensors if k.endswith("proj.weight")]:
            name = key.removesuffix(".weight")
            layer = _spqr_layer(*tensors[key].shape, gen)
            del tensors[key]
            dense[key] = layer.dequantize()
            for part in ("dense_weights", "row_offsets", "col_vals", "in_perm"):
                tensors[f"{name}.{part}"] = getattr(layer, part).data.contiguous()
                shapes[f"{name}.{part}.shape"] = getattr(layer, part).shape[0]
        config["quantization_config"]["shapes"] = shapes
        (folder / "config.json").write_text(json.dumps(config))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        ids = torch.randint(0, 384, (1, 12), generator=gen).to(device)
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device, dtype=torch.float16)
        ref = AutoModelForCausalLM.from_config(model.config, dtype=torch.float16)
        full = {k: v for k, v in load_file(folder / "model.safetensors").items() if "proj." not in k}
        ref.load_state_dict({**full, **dense}, strict=False)
        with torch.no_grad():
            rel = _gf_rel(model(ids).logits, ref.to(device)(ids).logits)
    assert rel < 1e-2, f"Transformers' SpQR logits differ from spqr-quant's dequantize by {rel:.3g}"
    return {**out, "rel_vs_dequantize": rel}


def higgs_check(device: str) -> dict:
    """Transformers quantizes a tiny model with HIGGS on load on CUDA (FLUTE, fast-hadamard-transform),
    within 4-bit error of the float model, saves it and loads it back identical; quantplug refuses
    the saved checkpoint on the GPU and the CPU with the route."""
    import torch

    why = _gf_missing("flute", "fast_hadamard_transform")
    if why:
        return {"skipped": f"Transformers' HIGGS path: {why}"}
    from transformers import AutoModelForCausalLM, HiggsConfig

    with tempfile.TemporaryDirectory() as tmp:
        folder = _gf_tiny(Path(tmp) / "fp", torch.float16, hidden_size=256, intermediate_size=512)
        ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0)).to(device)
        fp = AutoModelForCausalLM.from_pretrained(folder, device_map=device, dtype=torch.float16)
        qc = HiggsConfig(bits=4, p=2, group_size=64, hadamard_size=256)
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=qc, device_map=device, dtype=torch.float16
        )
        with torch.no_grad():
            ref, out = fp(ids).logits, model(ids).logits
        model.save_pretrained(Path(tmp) / "higgs")
        again = AutoModelForCausalLM.from_pretrained(Path(tmp) / "higgs", device_map=device)
        with torch.no_grad():
            reload_rel = _gf_rel(again(ids).logits, out)
        refused = {"quantplug_cpu": _gf_refused_on("cpu", Path(tmp) / "higgs"),
                   "quantplug_gpu": _gf_refused_on(device, Path(tmp) / "higgs")}  # fmt: skip
    rel = _gf_rel(out, ref)
    assert rel < 0.3 and reload_rel < 1e-3, f"HIGGS logits {rel:.3g} from float, reload {reload_rel:.3g}"
    return {**refused, "rel_vs_float": rel, "reload_rel": reload_rel}


def eetq_check(device: str) -> dict:
    """quantplug's eetq gives the same codes on the GPU as on the CPU; where Transformers' EETQ
    kernel loads (the `kernels` package and the Hub kernel kernels-community/quantization-eetq,
    cached when offline), its ``quant_weights`` gives quantplug's codes and scales bit for bit and
    Transformers' EETQ model quantplug's logits (float16)."""
    import torch

    import quantplug
    from quantplug.testing import tiny_llama

    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0))
    models = {d: tiny_llama().to(torch.float16).to(d) for d in ("cpu", device)}
    for model in models.values():
        quantplug.quantize(model, {"quant_method": "eetq"}, progress=False, kernel="none")
    name = "model.layers.0.mlp.down_proj"
    same = all(
        torch.equal(models["cpu"].get_submodule(n).codes, models[device].get_submodule(n).codes.cpu())
        for n in models["cpu"].quantplug_info.modules
    )
    assert same, "quantplug's eetq codes differ between the CPU and the GPU"
    with torch.no_grad():
        ours = models[device](ids.to(device)).logits
    out = {"codes_cpu_equal_gpu": True}
    why = _gf_missing("kernels")
    if why:
        return {**out, "skipped": f"Transformers' EETQ path: {why}"}
    try:
        from transformers.integrations.hub_kernels import get_kernel

        hub = get_kernel("kernels-community/quantization-eetq", version=1)
    except Exception as exc:  # offline without the kernel cached
        return {**out, "skipped": f"the EETQ Hub kernel did not load: {type(exc).__name__}: {exc}"[:300]}
    from transformers import AutoModelForCausalLM, EetqConfig

    weight = tiny_llama().to(torch.float16).get_submodule(name).weight.detach()
    unprocessed, _, scales = hub.quant_weights(weight.t().contiguous().cpu(), torch.int8, True)
    mine = models["cpu"].get_submodule(name)
    assert torch.equal(unprocessed.t(), mine.codes) and torch.equal(scales, mine.scales), (
        "EETQ's codes differ"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = _gf_tiny(Path(tmp) / "fp", torch.float16)
        hf = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=EetqConfig(), device_map=device, dtype=torch.float16
        )
        with torch.no_grad():
            rel = _gf_rel(hf(ids.to(device)).logits, ours)
    assert rel < 1e-2, f"Transformers' EETQ logits differ from quantplug's by {rel:.3g}"
    return {**out, "codes_and_scales_equal_eetq": True, "rel_vs_transformers": rel}


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
    for method, fn in (("spqr", spqr_check), ("higgs", higgs_check), ("eetq", eetq_check)):
        check(results, f"gpu_formats {method}", lambda fn=fn: fn(args.device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0 if all(v.get("ok") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
