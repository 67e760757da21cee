"""Bits per weight: what each backend mode really stores per quantized weight, on disk and in
memory, next to the format's theory.

    python bench/bits.py                       # every mode, one 4096 x 4096 bf16 Linear
    python bench/bits.py --shape 1024x1024     # smaller and faster (a smoke test; records nothing)
    python bench/bits.py --backends rtn,bnb    # a subset (records nothing)

For each mode one ``nn.Linear`` (bias-free, bf16 weights drawn N(0, 0.02), the layout of a
Llama-7B attention projection) is quantized through ``quantplug.quantize`` and saved with
``quantplug.save``; then

- **on disk**  = the byte sizes of that layer's tensors in model.safetensors (from the safetensors
  header: end - begin offset of every key under the layer's prefix; the JSON header itself and the
  file's metadata are not counted) x 8 / (out x in);
- **in memory** = the bytes of the tensors the backend's ``Quantizer.module_tensors`` reports for
  the quantized module (its state: codes, scales, zero points, code books, metadata tensors)
  x 8 / (out x in);
- **theory**   = the format's bits per weight: code bits (as packed) + the per-group scale / zero
  bits divided by the group size, with the dtypes the format documents (scales in the weight dtype
  unless the library fixes another, e.g. bitsandbytes' float32 absmax).

Each backend runs in its own fresh process (a backend that fails leaves the others measured).
Writes bench/results/bits.json and the ``bits`` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

NAME = "bits"
BACKENDS = ("rtn", "bitsandbytes", "hqq", "quanto", "torchao")
ALIASES = {"bnb": "bitsandbytes"}
DEFAULT_SHAPE = (4096, 4096)  # out, in
SCALE_BITS = 16  # the weight dtype (bf16): scales / zeros stored in it


# -- the modes and their theory --------------------------------------------------------------------


def modes(backend: str) -> list[dict[str, Any]]:
    """Every mode of ``backend`` this script measures: a label, the quantplug config (a dict, or the
    torchao mode arguments) and the theory as (bits per weight, formula)."""
    out: list[dict[str, Any]] = []
    if backend == "rtn":
        for b in (8, 4, 2):
            for g in (32, 64, 128, -1):
                gs = "channel" if g == -1 else g
                out.append(
                    {
                        "mode": f"int{b} g{gs} sym",
                        "config": {"quant_method": "rtn", "bits": b, "group_size": g, "symmetric": True},
                        "theory": ("sym", b, g),
                    }
                )
            out.append(
                {
                    "mode": f"int{b} g128 asym",
                    "config": {"quant_method": "rtn", "bits": b, "group_size": 128, "symmetric": False},
                    "theory": ("asym", b, 128),
                }
            )
    elif backend == "bitsandbytes":
        out.append(
            {
                "mode": "int8 (LLM.int8)",
                "config": {"quant_method": "bitsandbytes", "load_in_8bit": True},
                "theory": ("bnb8",),
            }
        )
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                out.append(
                    {
                        "mode": f"{qt}" + (" + double quant" if dq else ""),
                        "config": {
                            "quant_method": "bitsandbytes",
                            "load_in_4bit": True,
                            "bnb_4bit_quant_type": qt,
                            "bnb_4bit_use_double_quant": dq,
                            "bnb_4bit_compute_dtype": "bfloat16",
                        },
                        "theory": ("bnb4", dq),
                    }
                )
    elif backend == "hqq":
        for b in (1, 2, 3, 4, 8):
            for g in (64, 128):
                out.append(
                    {
                        "mode": f"{b}-bit g{g}",
                        "config": {"quant_method": "hqq", "nbits": b, "group_size": g},
                        "theory": ("hqq", b, g),
                    }
                )
    elif backend == "quanto":
        for w in ("int8", "int4", "int2", "float8"):
            out.append(
                {"mode": w, "config": {"quant_method": "quanto", "weights": w}, "theory": ("quanto", w)}
            )
    elif backend == "torchao":
        out.append(
            {"mode": "int8 weight-only", "torchao": {"mode": "int8_weight_only"}, "theory": ("ao8", "int8")}
        )
        out.append(
            {
                "mode": "int8 dynamic act. + int8 weight",
                "torchao": {"mode": "int8_dynamic_activation_int8_weight"},
                "theory": ("ao8", "int8"),
            }
        )
        for b in range(2, 9):
            sym = b >= 4  # TorchaoConfig.for_bits' choice: a zero point below 4 bits
            out.append(
                {
                    "mode": f"intx int{b} g32 {'sym' if sym else 'asym'}",
                    "torchao": {"mode": "intx_weight_only", "bits": b, "group_size": 32, "symmetric": sym},
                    "theory": ("intx", b, 32, sym),
                }
            )
        out.append(
            {
                "mode": "float8 weight-only",
                "torchao": {"mode": "float8_weight_only"},
                "theory": ("ao8", "float8"),
            }
        )
    return out


def theory(spec: tuple, in_features: int) -> tuple[float, str]:
    """(bits per weight, formula) of a format, for a layer with ``in_features`` inputs."""
    s, kind = SCALE_BITS, spec[0]
    if kind in ("sym", "asym"):
        _, b, g = spec
        n = in_features if g == -1 else g
        zero = 8 if kind == "asym" else 0
        return b + (s + zero) / n, f"{b} + ({s}-bit scale{' + 8-bit zero' if zero else ''}) / {n}"
    if kind == "bnb8":
        return 8 + 32 / in_features, f"8 + 32-bit row scale (SCB) / {in_features}"
    if kind == "bnb4":
        if spec[1]:
            return 4 + 8 / 64 + 32 / (
                64 * 256
            ), "4 + 8-bit absmax / 64 + 32-bit absmax-of-absmax / (64 x 256)"
        return 4 + 32 / 64, "4 + 32-bit absmax / 64"
    if kind == "hqq":
        _, b, g = spec
        code = 3.2 if b == 3 else b  # 3 bits: hqq packs 10 codes per int32
        return code + 2 * s / g, f"{code} + ({s}-bit scale + {s}-bit zero) / {g}" + (
            " (3-bit: 10 codes per int32)" if b == 3 else ""
        )
    if kind == "quanto":
        w = spec[1]
        if w in ("int8", "float8"):
            return 8 + s / in_features, f"8 + {s}-bit row scale / {in_features}"
        b = int(w[3:])
        return b + 2 * s / 128, f"{b} + ({s}-bit scale + {s}-bit shift) / 128 (quanto's group size)"
    if kind == "ao8":  # torchao computes and stores these scales in float32
        return 8 + 32 / in_features, f"8 + 32-bit row scale / {in_features}"
    if kind == "intx":
        _, b, g, sym = spec
        zero = 0 if sym else b
        return b + (s + zero) / g, f"{b} + ({s}-bit scale{'' if sym else f' + {b}-bit zero'}) / {g}"
    raise ValueError(spec)


# -- child: one backend ------------------------------------------------------------------------------


def _safetensors_layer_bytes(path: Path, prefix: str) -> dict[str, int]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return {
        k: e["data_offsets"][1] - e["data_offsets"][0]
        for k, e in header.items()
        if k.startswith(prefix + ".")
    }


def child(backend: str, out_f: int, in_f: int) -> dict:
    import torch
    from torch import nn

    import quantplug

    results = []
    for m in modes(backend):
        row: dict[str, Any] = {"backend": backend, "mode": m["mode"]}
        torch.manual_seed(0)
        model = nn.Module()
        model.proj = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            model.proj.weight.normal_(0, 0.02)
        try:
            if "torchao" in m:
                from quantplug_torchao import TorchaoConfig

                kw = dict(m["torchao"])
                config = TorchaoConfig.from_mode(kw.pop("mode"), **kw)
            else:
                config = m["config"]
            row["config"] = config if isinstance(config, dict) else config.to_dict()
            t0 = time.perf_counter()
            report = quantplug.quantize(model, config, progress=False)
            row["quantize_s"] = time.perf_counter() - t0
            if report.converted != ["proj"]:
                raise RuntimeError(f"expected the layer to be converted, report: {report}")
            qmodule = model.proj
            row["module"] = type(qmodule).__name__
            tensors = model.quantplug_info.quantizer.module_tensors("proj", qmodule)
            row["memory_tensors"] = {
                k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "bytes": _nbytes(t)}
                for k, t in tensors.items()
            }
            row["memory_bytes"] = sum(v["bytes"] for v in row["memory_tensors"].values())
            with tempfile.TemporaryDirectory() as tmp:
                folder = quantplug.save(model, Path(tmp) / "ckpt")
                files = sorted(folder.glob("*.safetensors"))
                disk: dict[str, int] = {}
                for f in files:
                    disk.update(_safetensors_layer_bytes(f, "proj"))
            row["disk_tensors"] = disk
            row["disk_bytes"] = sum(disk.values())
            numel = out_f * in_f
            row["disk_bits"] = 8 * row["disk_bytes"] / numel
            row["memory_bits"] = 8 * row["memory_bytes"] / numel
        except Exception as exc:  # record and go on: one mode failing must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["theory_bits"], row["theory_formula"] = theory(m["theory"], in_f)
        results.append(row)
        print(
            f"{backend:12s} {m['mode']:32s} disk {row.get('disk_bits', float('nan')):6.3f}  "
            f"mem {row.get('memory_bits', float('nan')):6.3f}  theory {row['theory_bits']:6.3f}"
            + (f"  ERROR {row['error']}" if "error" in row else ""),
            file=sys.stderr,
            flush=True,
        )
        del model
    return {"backend": backend, "rows": results}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


# -- parent ------------------------------------------------------------------------------------------

#: why a measured figure differs from the theory, per (backend, mode prefix); checked against the data
NOTES = {
    ("torchao", "intx"): (
        "IntxUnpackedToInt8Tensor (the CPU layout whose kernels ship in the wheel) keeps one code per int8 "
        "byte at any bit width, plus an int8 zero point per group even when symmetric: 8 + (16 + 8) / 32"
    ),
    ("torchao", "int8"): "+ an int8 zero point per row, stored although the mapping is symmetric",
    ("hqq", "3-bit"): "3-bit codes are packed 10 per int32 (3.2 bits a code)",
    ("bitsandbytes", "nf4 + double"): "+ a 256-entry float32 code book per layer (negligible at this size)",
    ("bitsandbytes", "fp4 + double"): "+ a 256-entry float32 code book per layer (negligible at this size)",
}


def _note(row: dict) -> str:
    if "error" in row:
        return f"failed here: {row['error']}"
    parts = []
    for (backend, prefix), text in NOTES.items():
        if row["backend"] == backend and row["mode"].startswith(prefix):
            parts.append(text)
    if abs(row["disk_bits"] - row["memory_bits"]) > 1e-9:
        parts.append("disk and memory differ")
    rel = row["memory_bits"] / row["theory_bits"] - 1
    if abs(rel) > 0.01 and not parts:
        parts.append(_auto_note(row))
    return "; ".join(p for p in parts if p)


def _auto_note(row: dict) -> str:
    """Name the stored tensors, so a reader sees where the bits go."""
    items = sorted(row["memory_tensors"].items(), key=lambda kv: -kv[1]["bytes"])
    numel = row["numel"]
    return "stored: " + ", ".join(
        f"{k} {v['dtype']}{v['shape']} ({8 * v['bytes'] / numel:.3f} b/w)" for k, v in items[:4] if v["bytes"]
    )


def results_markdown(data: dict) -> str:
    mach, v = data["machine"], data["machine"]["versions"]
    out_f, in_f = data["shape"]
    lines = [
        "## Bits per weight: stored vs the format's theory",
        "",
        f"One bias-free `nn.Linear` {in_f} -> {out_f} (bf16 weights, N(0, 0.02)) per mode, quantized with "
        "`quantplug.quantize` and saved with `quantplug.save`. **Disk** = bytes of the layer's tensors in "
        "model.safetensors (from the header's offsets; header JSON not counted) x 8 / weights; **memory** = "
        "bytes of the tensors the backend's `Quantizer.module_tensors` reports (codes, scales, zeros, code "
        "books, metadata tensors) x 8 / weights; **theory** = code bits + scale/zero bits per group / group "
        "size, scales in the weight dtype (bf16) unless the format fixes another.",
        "",
        "| backend | mode | disk b/w | memory b/w | theory b/w | theory | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['backend']} | {r['mode']} | – | – | {r['theory_bits']:.3f} | {r['theory_formula']} | "
                f"{_note(r)} |"
            )
            continue
        lines.append(
            f"| {r['backend']} | {r['mode']} | {r['disk_bits']:.3f} | {r['memory_bits']:.3f} | "
            f"{r['theory_bits']:.3f} | {r['theory_formula']} | {_note(r)} |"
        )
    lines += [
        "",
        f"- Date: {data['date']}",
        f"- Command: `{data['command']}`",
        f"- Machine: {common.machine_line(mach)}",
        "- Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + (f", code at git {mach['git_revision']}" if mach.get("git_revision") else ""),
        f"- Raw figures (per-tensor dtypes, shapes and bytes): `bench/results/{NAME}.json`",
    ]
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected OUTxIN, e.g. 4096x4096") from None
    if a < 1 or b < 1 or b % 128:
        raise argparse.ArgumentTypeError(
            f"--shape {text!r}: both sizes must be positive and IN a multiple of 128 (every group size used)"
        )
    return a, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", type=_parse_shape, default=DEFAULT_SHAPE, help="OUTxIN (default 4096x4096)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list (default: all five)")
    p.add_argument("--no-record", action="store_true", help="do not write bench/results/ or bench/RESULTS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out_f, in_f = args.shape
    if args.child:
        common.emit_result(child(args.child, out_f, in_f))
        return 0
    backends = [ALIASES.get(b.strip(), b.strip()) for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)} (or bnb)")
    record = not args.no_record and args.shape == DEFAULT_SHAPE and set(backends) == set(BACKENDS)
    machine = common.machine_info(
        ("torch", "quantplug", "bitsandbytes", "hqq", "optimum-quanto", "torchao", "safetensors")
    )
    rows = []
    for b in backends:
        try:
            res = common.run_child([__file__, "--child", b, "--shape", f"{out_f}x{in_f}"], timeout=1800)
            rows += res["rows"]
        except common.ChildError as exc:
            print(f"{b}: the child failed:\n{exc}", file=sys.stderr)
            rows += [
                {
                    "backend": b,
                    "mode": m["mode"],
                    "error": "the backend's process failed (see the run's log)",
                    "theory_bits": theory(m["theory"], in_f)[0],
                    "theory_formula": theory(m["theory"], in_f)[1],
                }
                for m in modes(b)
            ]
    for r in rows:
        r["numel"] = out_f * in_f
    data = {
        "benchmark": NAME,
        "date": common.now_iso(),
        "command": shlex.join(["python", "bench/bits.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "shape": [out_f, in_f],
        "weight_dtype": "bfloat16",
        "rows": rows,
    }
    for r in rows:
        r["note"] = _note(r)
    md = results_markdown(data)
    print(md)
    if record:
        common.write_json(common.RESULTS_DIR / f"{NAME}.json", data)
        common.update_results_section(NAME, md)
        print(f"recorded bench/results/{NAME}.json and bench/RESULTS.md", file=sys.stderr)
    else:
        print("not recorded (a smaller shape or a subset of backends, or --no-record)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
