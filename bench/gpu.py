"""GPU decode and prefill latency of every backend mode against bf16, on Llama-7B-sized layers,
quantized through ``quantplug.quantize(model, config, device="cuda")``.

The model is ``--layers`` (default 4) Llama-7B blocks without the attention itself: q/k/v/o
4096x4096, gate/up 11008x4096, down 4096x11008, RMS norms and residuals, bf16 random weights
(normal, std 0.02, fixed seeds). For each mode, in its own fresh process (a crash or a sticky CUDA
error in one backend cannot spoil the others, and each has a hard time limit):

- MB: the quantized weights' bytes (``QuantizeReport.bytes_after``; bf16: the parameters);
- rel. error: ||out - out_bf16|| / ||out_bf16|| of the model's output on the prefill input;
- decode: one token (M=1), replayed from a CUDA graph when capture works and the replay matches
  eager, else eager (the table says which, and why);
- prefill: M=2048 tokens, eager;
- each latency the median of many iterations timed with CUDA events after warm-up, and its
  ratio to bf16 measured in the same run;
- HBM floor: weight bytes / the device-to-device copy bandwidth measured by this script (bytes
  read + written per second), the least time a decode step that reads every weight once can take.

    python bench/gpu.py                      # on a CUDA machine: records bench/results/gpu.json + RESULTS.md
    python bench/gpu.py --out DIR            # writes DIR/gpu.json and DIR/gpu.md only
    python bench/gpu.py --device cpu --tiny  # a small smoke run on CPU (CUDA-only modes say "needs cuda")
    python bench/gpu.py --record gpu.json    # records a gpu.json measured elsewhere
    python bench/gpu.py --modes bf16,rtn-int4-g128

A failing mode is reported with its error and the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

NAME = "gpu"
SEED = 1234

# (name, short description, config dict or torchao mode spec, needs CUDA)
MODES: list[tuple[str, str, dict[str, Any], bool]] = [
    ("bf16", "no quantization (baseline)", {}, False),
    (
        "bnb-nf4",
        "bitsandbytes nf4, bf16 compute",
        {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "bfloat16",
        },
        False,
    ),
    ("bnb-int8", "bitsandbytes LLM.int8()", {"quant_method": "bitsandbytes", "load_in_8bit": True}, False),
    ("hqq-4bit-g64", "hqq 4-bit, group 64", {"quant_method": "hqq", "nbits": 4, "group_size": 64}, False),
    ("quanto-int8", "optimum-quanto int8 weights", {"quant_method": "quanto", "weights": "int8"}, False),
    ("quanto-int4", "optimum-quanto int4 weights", {"quant_method": "quanto", "weights": "int4"}, False),
    ("torchao-int8wo", "torchao int8 weight-only", {"torchao_mode": "int8_weight_only"}, False),
    (
        "torchao-int4wo",
        "torchao int4 weight-only, group 128, tile_packed_to_4d",
        {"torchao_mode": "int4_weight_only", "group_size": 128},
        True,
    ),
    (
        "torchao-fp8dyn",
        "torchao float8 dynamic activation + float8 weight, per row",
        {"torchao_mode": "float8_dynamic_activation_float8_weight", "float8_granularity": "row"},
        True,
    ),
    ("rtn-int4-g128", "rtn int4, group 128", {"quant_method": "rtn", "bits": 4, "group_size": 128}, False),
    ("rtn-int8", "rtn int8, per channel", {"quant_method": "rtn", "bits": 8, "group_size": -1}, False),
]
MODE_NAMES = [m[0] for m in MODES]

FULL = {"hidden": 4096, "intermediate": 11008, "layers": 4, "prefill": 2048, "copy_mib": 2048}
TINY = {"hidden": 256, "intermediate": 512, "layers": 2, "prefill": 64, "copy_mib": 64}

PACKAGES = (
    "torch",
    "transformers",
    "quantplug",
    "quantplug-rtn",
    "quantplug-bnb",
    "quantplug-hqq",
    "quantplug-quanto",
    "quantplug-torchao",
    "bitsandbytes",
    "hqq",
    "optimum-quanto",
    "torchao",
)


# -- child side: one mode in this process ---------------------------------------------------------


def build_model(sizes: dict[str, int], device: str):
    """``sizes['layers']`` Llama blocks' linear layers (attention's matmuls without the attention),
    bf16, random weights from fixed seeds (the same weights in every process on the same device)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    h, i = sizes["hidden"], sizes["intermediate"]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            kw = {"bias": False, "device": device, "dtype": torch.bfloat16}
            self.q_proj, self.k_proj = nn.Linear(h, h, **kw), nn.Linear(h, h, **kw)
            self.v_proj, self.o_proj = nn.Linear(h, h, **kw), nn.Linear(h, h, **kw)
            self.gate_proj, self.up_proj = nn.Linear(h, i, **kw), nn.Linear(h, i, **kw)
            self.down_proj = nn.Linear(i, h, **kw)

        def forward(self, x):
            y = F.rms_norm(x, (h,))
            x = x + self.o_proj(self.q_proj(y) + self.k_proj(y) + self.v_proj(y))
            y = F.rms_norm(x, (h,))
            return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(sizes["layers"]))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Stack().eval()
    gen = torch.Generator(device=device)
    with torch.no_grad():
        for n, p in enumerate(model.parameters()):
            gen.manual_seed(SEED + n)
            p.normal_(0.0, 0.02, generator=gen)
    return model


def make_inputs(sizes: dict[str, int], device: str):
    import torch

    gen = torch.Generator(device=device).manual_seed(SEED - 1)
    x = torch.randn(1, sizes["prefill"], sizes["hidden"], generator=gen, device=device, dtype=torch.bfloat16)
    return x, x[:, :1].clone()


def make_config(spec: dict[str, Any]):
    import quantplug

    if "torchao_mode" in spec:
        from quantplug_torchao import TorchaoConfig

        kw = {k: v for k, v in spec.items() if k != "torchao_mode"}
        return TorchaoConfig.from_mode(spec["torchao_mode"], **kw)
    return quantplug.config_from_dict(spec)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, device: str, *, min_iters: int, max_iters: int, budget_s: float, warmup: int = 3) -> dict:
    """Median and spread of ``fn()``'s time in ms: CUDA events around each call on a GPU, the
    wall clock on CPU; at least ``min_iters`` and at most ``max_iters`` calls, stopping once
    ``budget_s`` seconds have passed."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    if device.startswith("cuda"):
        events = []
        while len(events) < max_iters and (len(events) < min_iters or time.perf_counter() < t_end):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if len(events) % 16 == 0:  # keep the host within a few calls of the GPU, so the budget holds
                end.synchronize()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": common.median(times),
        "p10_ms": times[len(times) // 10],
        "p90_ms": times[(len(times) * 9) // 10],
        "iters": len(times),
    }


def rel_error(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def decode_fn(model, x1, device: str):
    """A callable running one decode step, from a CUDA graph when capture works and its replay
    matches eager; returns (fn, path, note)."""
    import torch

    with torch.no_grad():
        eager_out = model(x1)
    eager = lambda: model(x1)  # noqa: E731
    if not device.startswith("cuda"):
        return eager, "eager", "no CUDA graphs off CUDA"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                model(x1)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = model(x1)
        graph.replay()
        torch.cuda.synchronize()
        diff = rel_error(static_out, eager_out)
        if not diff <= 1e-3:
            return eager, "eager", f"graph replay differs from eager (rel {diff:.2e})"
        return graph.replay, "cuda graph", ""
    except Exception as exc:  # capture refused: measure eager
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return eager, "eager", f"capture failed: {msg}"


def measure_copy_bandwidth(device: str, mib: int) -> dict:
    """Device-to-device copy of a ``mib`` MiB buffer: bytes read + written per second."""
    import torch

    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, min_iters=10, max_iters=50, budget_s=2.0)
    return {"bytes": n, "median_ms": t["median_ms"], "bytes_per_s": 2 * n / (t["median_ms"] / 1e3)}


def run_mode(mode: str, device: str, sizes: dict[str, int]) -> dict[str, Any]:
    import torch

    import quantplug

    _, desc, spec, cuda_only = next(m for m in MODES if m[0] == mode)
    row: dict[str, Any] = {"mode": mode, "description": desc, "config": spec}
    if cuda_only and not device.startswith("cuda"):
        row.update(status="needs cuda", error=f"{mode} runs on CUDA only; skipped on {device}")
        return row
    torch.manual_seed(SEED)
    model = build_model(sizes, device)
    x, x1 = make_inputs(sizes, device)
    with torch.no_grad():
        ref = model(x)
    if mode == "bf16":
        row["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        row["rel_error"] = 0.0
    else:
        config = make_config(spec)
        t0 = time.perf_counter()
        try:
            report = quantplug.quantize(model, config, device=device, progress=False)
        except quantplug.BackendUnavailableError as exc:
            row.update(status="refused", error=str(exc))
            return row
        sync(device)
        row["quantize_s"] = round(time.perf_counter() - t0, 3)
        row["weight_bytes"] = report.bytes_after
        row["converted"] = len(report.converted)
        row["module_type"] = type(model.layers[0].q_proj).__name__
        with torch.no_grad():
            row["rel_error"] = rel_error(model(x), ref)
    del ref
    with torch.no_grad():
        # eager first: a failed graph capture cannot then cost the eager figures
        row["prefill"] = time_ms(lambda: model(x), device, min_iters=5, max_iters=50, budget_s=1.5)
        row["decode_eager"] = time_ms(lambda: model(x1), device, min_iters=20, max_iters=400, budget_s=1.0)
        fn, path, note = decode_fn(model, x1, device)
        row["decode_path"], row["decode_note"] = path, note
        if path == "cuda graph":
            row["decode"] = time_ms(fn, device, min_iters=20, max_iters=400, budget_s=1.5)
        else:
            row["decode"] = row["decode_eager"]
    if device.startswith("cuda"):
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    row["status"] = "ok"
    return row


def child_main(what: str, device: str, tiny: bool) -> None:
    sizes = TINY if tiny else FULL
    try:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            result = {"status": "needs cuda", "error": f"torch {torch.__version__} sees no CUDA device"}
        elif what == "env":
            result = {"status": "ok", "torch": torch.__version__, "torch_cuda": torch.version.cuda}
            if device.startswith("cuda"):
                props = torch.cuda.get_device_properties(0)
                result.update(
                    gpu=torch.cuda.get_device_name(0),
                    compute_capability=list(torch.cuda.get_device_capability(0)),
                    gpu_memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count,
                )
            result["copy"] = measure_copy_bandwidth(device, sizes["copy_mib"])
        else:
            result = run_mode(what, device, sizes)
    except Exception as exc:
        result = {
            "mode": what,
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    common.emit_result(result)


# -- parent side ------------------------------------------------------------------------------------


def nvidia_smi() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_child_safe(argv: list[str], timeout: float, what: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = common.run_child(argv, timeout=timeout, time_v=False, env={"PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        res = {"mode": what, "status": "timeout", "error": f"over the {timeout:.0f} s limit per mode"}
    except common.ChildError as exc:
        res = {"mode": what, "status": "crashed", "error": str(exc)[-3000:]}
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    return res


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(result: dict[str, Any]) -> None:
    """Add ratios vs bf16 and the HBM floor to each row (in place)."""
    rows = result["modes"]
    base = next((r for r in rows if r.get("mode") == "bf16" and r.get("status") == "ok"), None)
    bw = (result.get("env") or {}).get("copy", {}).get("bytes_per_s")
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["decode_ms"] = r["decode"]["median_ms"]
        r["prefill_ms"] = r["prefill"]["median_ms"]
        r["decode_eager_ms"] = r["decode_eager"]["median_ms"]
        r["decode_vs_bf16"] = ratio(r["decode_ms"], base and base["decode"]["median_ms"])
        r["decode_eager_vs_bf16_eager"] = ratio(
            r["decode_eager_ms"], base and base["decode_eager"]["median_ms"]
        )
        r["prefill_vs_bf16"] = ratio(r["prefill_ms"], base and base["prefill"]["median_ms"])
        r["hbm_floor_ms"] = r["weight_bytes"] / bw * 1e3 if bw else None
        r["decode_vs_floor"] = ratio(r["decode_ms"], r["hbm_floor_ms"])


def _f(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def markdown(result: dict[str, Any]) -> str:
    env = result.get("env") or {}
    sizes = result["sizes"]
    copy = env.get("copy") or {}
    lines = [
        "## GPU decode and prefill latency vs bf16",
        "",
        f"{sizes['layers']} Llama-7B-sized blocks (q/k/v/o {sizes['hidden']}x{sizes['hidden']}, gate/up "
        f"{sizes['intermediate']}x{sizes['hidden']}, down {sizes['hidden']}x{sizes['intermediate']}; "
        "attention matmuls without the attention itself, RMS norms, residuals), bf16 random weights, "
        "each mode quantized through `quantplug.quantize(model, config, device=...)` in its own process. "
        f"Decode = 1 token, prefill = {sizes['prefill']} tokens; medians of CUDA-event timings after "
        "warm-up. rel. err = output error vs bf16 on the prefill input. HBM floor = weight bytes / "
        f"measured device-to-device copy bandwidth ({_f(copy.get('bytes_per_s') and copy['bytes_per_s'] / 1e12, '.2f')} "
        "TB/s, bytes read + written): the least time a decode step reading every weight once can take.",
        "",
        "| mode | MB | rel. err | decode ms (M=1) | decode path | vs bf16 | HBM floor ms | x floor "
        f"| decode eager ms | vs bf16 eager | prefill ms (M={sizes['prefill']}) | vs bf16 | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in result["modes"]:
        if r.get("status") != "ok":
            err = (r.get("error") or "").strip().splitlines()
            lines.append(f"| {r['mode']} | {r.get('status')}: {(err[-1] if err else '')[:160]} |||||||||||")
            continue
        path = r["decode_path"]
        if r.get("decode_note") and path != "cuda graph" and result["device"].startswith("cuda"):
            notes.append(f"- {r['mode']}: decode eager, {r['decode_note']}")
        lines.append(
            f"| {r['mode']} | {r['weight_bytes'] / 1e6:.{0 if r['weight_bytes'] >= 1e7 else 2}f} | {r['rel_error']:.4f} | {r['decode_ms']:.3f} | {path} "
            f"| {_f(r['decode_vs_bf16'], '.2f')} | {_f(r['hbm_floor_ms'], '.3f')} | {_f(r['decode_vs_floor'], '.1f')} "
            f"| {r['decode_eager_ms']:.3f} | {_f(r['decode_eager_vs_bf16_eager'], '.2f')} "
            f"| {r['prefill_ms']:.2f} | {_f(r['prefill_vs_bf16'], '.2f')} | {_f(r.get('quantize_s'), '.1f')} |"
        )
    if notes:
        lines += ["", *notes]
    vers = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)
    gpu = env.get("gpu") or result.get("device")
    lines += [
        "",
        f"- Date: {result['date']}",
        f"- Command: `{result['command']}`",
        f"- Device: {gpu}"
        + (f" (cc {'.'.join(map(str, env['compute_capability']))})" if env.get("compute_capability") else "")
        + (f"; nvidia-smi: {result['nvidia_smi']}" if result.get("nvidia_smi") else "")
        + f"; torch CUDA {env.get('torch_cuda')}; host {result['machine']}",
        f"- Versions: {vers} (git {result.get('git_revision')})",
        f"- Total wall time {result['total_s']:.0f} s; raw figures: `bench/results/gpu.json`",
    ]
    return "\n".join(lines)


def record(path: Path) -> None:
    result = json.loads(path.read_text())
    out = common.write_json(common.RESULTS_DIR / f"{NAME}.json", result)
    md = common.update_results_section(NAME, markdown(result), common.RESULTS_MD)
    print(f"recorded {path} -> {out} and the '{NAME}' section of {md}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small layers (hidden 256): a smoke run")
    ap.add_argument("--modes", default=",".join(MODE_NAMES), help=f"comma list of {', '.join(MODE_NAMES)}")
    ap.add_argument("--out", type=Path, help="write gpu.json and gpu.md here instead of recording them")
    ap.add_argument("--record", type=Path, help="record this gpu.json into bench/results and RESULTS.md")
    ap.add_argument("--mode-timeout", type=float, default=90.0, help="seconds per mode (hard limit)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds in all; later modes are skipped")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        child_main(args.child, args.device, args.tiny)
        return 0
    if args.record:
        record(args.record)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODE_NAMES)}")
    if "bf16" not in modes:
        modes.insert(0, "bf16")  # the ratios need it

    t_start = time.perf_counter()
    base = [str(Path(__file__).resolve()), "--device", args.device] + (["--tiny"] if args.tiny else [])
    info = common.machine_info(PACKAGES)
    result: dict[str, Any] = {
        "date": common.now_iso(),
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
        "device": args.device,
        "sizes": TINY if args.tiny else FULL,
        "machine": common.machine_line(info),
        "versions": info["versions"],
        "git_revision": info["git_revision"],
        "git_diff_sha256": info["git_diff_sha256"],
        "nvidia_smi": nvidia_smi() if args.device.startswith("cuda") else None,
        "modes": [],
    }
    env = run_child_safe([*base, "--child", "env"], args.mode_timeout, "env")
    result["env"] = env
    print(f"env: {json.dumps(env)[:400]}", flush=True)
    for mode in modes:
        left = args.budget - (time.perf_counter() - t_start)
        if env.get("status") == "needs cuda":
            row = {"mode": mode, "status": "needs cuda", "error": env.get("error")}
        elif left < 10:
            row = {"mode": mode, "status": "skipped", "error": f"total time budget {args.budget:.0f} s spent"}
        else:
            row = run_child_safe([*base, "--child", mode], min(args.mode_timeout, left), mode)
        row.setdefault("mode", mode)
        result["modes"].append(row)
        brief = (
            f"decode {row['decode']['median_ms']:.3f} ms ({row['decode_path']}), prefill "
            f"{row['prefill']['median_ms']:.2f} ms, rel err {row['rel_error']:.4f}, {row['weight_bytes'] / 1e6:.0f} MB"
            if row.get("status") == "ok"
            else (row.get("error") or "")[-300:]
        )
        print(f"{mode:16s} {row.get('status'):10s} {row.get('wall_s')} s  {brief}", flush=True)
    result["total_s"] = time.perf_counter() - t_start
    summarize(result)

    if args.out:
        out_dir = args.out
    elif args.tiny or not args.device.startswith("cuda"):
        out_dir = common.BENCH_DIR / ".cache" / NAME  # a smoke run is not a result
    else:
        out_dir = None
    if out_dir is None:
        common.write_json(common.RESULTS_DIR / f"{NAME}.json", result)
        common.update_results_section(NAME, markdown(result), common.RESULTS_MD)
        print(
            f"wrote {common.RESULTS_DIR / (NAME + '.json')} and the '{NAME}' section of {common.RESULTS_MD}"
        )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        common.write_json(out_dir / f"{NAME}.json", result)
        (out_dir / f"{NAME}.md").write_text(markdown(result) + "\n")
        print(f"wrote {out_dir / (NAME + '.json')} and {out_dir / (NAME + '.md')}")
    print(markdown(result))
    ok = sum(r.get("status") == "ok" for r in result["modes"])
    print(f"{ok}/{len(result['modes'])} modes measured in {result['total_s']:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
