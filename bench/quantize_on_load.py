"""Peak memory of quantize-on-load: ``quantplug.load(ckpt, config=RtnConfig(bits=4))`` on a ~1B-parameter
synthetic bf16 Llama checkpoint, against a plain bf16 ``from_pretrained`` and the bare import cost; and
for the backends both support, quantplug's quantize-on-load against Transformers' own
(``from_pretrained(ckpt, quantization_config=..., device_map="cpu")``) with the same settings.

    python bench/quantize_on_load.py            # full size (~1.9 GB checkpoint), 3 runs, records results
    python bench/quantize_on_load.py --quick    # tiny model, 1 run, smoke test (records nothing)
    python bench/quantize_on_load.py --modes import,rtn4,bf16   # a subset of the modes below

The checkpoint is generated once (random weights, std 0.02, written by Transformers' save_pretrained)
and cached under --cache-dir. Every measurement runs in a fresh Python process that imports what it
needs, does the work and reports its own peak RSS (getrusage ru_maxrss, i.e. /proc VmHWM; also
/usr/bin/time -v from outside when available); the figures are medians over --runs.

Modes (each one process per run):
  import   import torch, transformers, quantplug, quantplug_rtn and resolve LlamaForCausalLM and
           quantplug.load: the fixed cost every other mode pays.
  rtn4     quantplug.load(ckpt, config=RtnConfig(bits=4, group_size=128)), then one forward pass.
  bf16     AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16), then one forward pass.
  rtn4-mmap  rtn4 with MALLOC_MMAP_THRESHOLD_=1048576 in the environment (diagnostic, skip it with
           --no-diagnostic): glibc then serves every allocation over 1 MiB with its own mmap and
           returns it to the system on free, so the figure shows what the load holds without the
           freed-but-kept heap memory that the default allocator settings leave behind.
  bnb4     quantplug.load(ckpt, config=BnbConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
           bnb_4bit_compute_dtype="bfloat16")), then one forward pass.
  hf-bnb4  AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=BitsAndBytesConfig(
           load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
           device_map="cpu", dtype=torch.bfloat16), then one forward pass.
  ao8      quantplug.load(ckpt, config=TorchaoConfig.from_mode("int8_weight_only")), then a forward.
  hf-ao8   from_pretrained(ckpt, quantization_config=TorchAoConfig(Int8WeightOnlyConfig(
           granularity=PerRow(), version=2)), device_map="cpu", dtype=torch.bfloat16), then a forward.

Full results go to bench/results/quantize_on_load.json and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

NAME = "quantize_on_load"
GOAL_BYTES = 1.5e9  # issue acceptance: quantize-on-load peak RSS under 1.5 GB
GOAL_RATIO = 0.6  # issue 9: quantplug's quantize-on-load peak RSS at most 0.6x Transformers'
#: quantplug mode -> the Transformers mode doing the same quantization on load
VERSUS = {"bnb4": "hf-bnb4", "ao8": "hf-ao8"}
GEN_VERSION = 1  # bump when the generated checkpoint changes, so cached ones are rebuilt

# ~0.95B parameters: the model BACKENDS.md measured Transformers' own quantize-on-load with.
FULL_MODEL = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
QUICK_MODEL = dict(
    FULL_MODEL,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=1024,
)
RTN = dict(bits=4, group_size=128)
BNB4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")
PROMPT_LEN = 8
DIAGNOSTIC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


# -- the checkpoint -------------------------------------------------------------------------------


def _spec_hash(model_cfg: dict) -> str:
    raw = json.dumps({"model": model_cfg, "gen": GEN_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:10]


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _count_params(folder: Path) -> int:
    """Parameters stored in the checkpoint, from the safetensors headers (no torch needed)."""
    total = 0
    for f in _safetensors_files(folder):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for e in header.values():
            count = 1
            for d in e["shape"]:
                count *= d
            total += count
    return total


def ensure_checkpoint(cache_dir: Path, model_cfg: dict, label: str) -> tuple[Path, dict]:
    """The cached checkpoint folder for ``model_cfg`` (generated in a child process when missing)."""
    folder = cache_dir / f"llama-{label}-{_spec_hash(model_cfg)}"
    meta_path = folder / "bench_meta.json"
    if not meta_path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _log(f"generating the {label} checkpoint in {folder} (once; later runs reuse it) ...")
        try:
            gen = common.run_child(
                [__file__, "--child", "generate", "--ckpt", str(tmp), "--model-json", json.dumps(model_cfg)],
                timeout=3600,
            )
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _log(
            f"  generated in {gen['wall_s']:.0f} s (peak RSS {common.fmt_gb(gen['ru_maxrss'])}, not part of the benchmark)"
        )
    meta = json.loads(meta_path.read_text())
    files = _safetensors_files(folder)
    meta["files"] = {f.name: f.stat().st_size for f in files}
    meta["checkpoint_bytes"] = sum(meta["files"].values())
    meta["layout"] = "single file" if len(files) == 1 else f"{len(files)} shards"
    meta["params"] = _count_params(folder)
    return folder, meta


def _warm_page_cache(folder: Path) -> None:
    """Read the checkpoint once so every run finds it in the page cache (reads into one reused
    buffer: the parent's RSS does not grow, and the children do not count page-cache pages)."""
    buf = bytearray(16 * common.MiB)
    view = memoryview(buf)
    for f in _safetensors_files(folder):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass


# -- children ------------------------------------------------------------------------------------


def _child_generate(ckpt: Path, model_cfg: dict) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    t0 = time.perf_counter()
    config = transformers.LlamaConfig(**model_cfg)
    # Built directly in bf16 (never a full fp32 copy); Transformers' init draws N(0, initializer_range).
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    params = model.num_parameters()
    model.save_pretrained(ckpt)  # safetensors; Transformers 5's default max_shard_size is 50GB
    meta = {
        "generator": "transformers.LlamaForCausalLM._from_config(LlamaConfig(**model), dtype=torch.bfloat16)"
        " + save_pretrained(); torch.manual_seed(0)",
        "gen_version": GEN_VERSION,
        "model": model_cfg,
        "params_in_model": params,
        "param_dtypes": dtypes,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (ckpt / "bench_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"wall_s": time.perf_counter() - t0, **common.memory_snapshot()}


def _imports(mode: str = "rtn4") -> None:
    """What ``mode`` needs, imported before its load is measured (the backend library for the
    quantized modes; quantplug and its plugin for quantplug's own modes)."""
    if "ao8" in mode:
        os.environ.setdefault(
            "TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1"
        )  # as quantplug-torchao sets it on CPU
    import torch  # noqa: F401
    import transformers

    transformers.LlamaForCausalLM  # noqa: B018 (Transformers imports lazily: pay for modeling_llama here)
    transformers.AutoModelForCausalLM  # noqa: B018
    if "bnb4" in mode:
        import bitsandbytes  # noqa: F401
    if "ao8" in mode:
        import torchao.quantization  # noqa: F401
    if mode.startswith("hf-") or mode == "bf16":
        return
    import quantplug

    quantplug.load  # noqa: B018 (quantplug imports its checkpoint code lazily)
    if "bnb4" in mode:
        import quantplug_bnb.quantizer  # noqa: F401
    elif "ao8" in mode:
        import quantplug_torchao.quantizer  # noqa: F401
    else:
        import quantplug_rtn  # noqa: F401


class _Sampler:
    """Samples this process's RSS every ``period`` seconds in a thread: the memory curve of a step."""

    def __init__(self, period: float = 0.05):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, common.memory_snapshot()["rss"]))
            self._stop.wait(self.period)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def curve(self, points: int = 40) -> list[list[float]]:
        """The samples, thinned to about ``points`` (keeping the highest one), as [seconds, MB]."""
        if not self.samples:
            return []
        step = max(1, len(self.samples) // points)
        keep = set(range(0, len(self.samples), step)) | {len(self.samples) - 1}
        keep.add(max(range(len(self.samples)), key=lambda i: self.samples[i][1] or 0))
        return [[round(t, 2), round((r or 0) / 1e6, 1)] for i, (t, r) in enumerate(self.samples) if i in keep]


def _child_measure(mode: str, ckpt: Path) -> dict:
    out: dict[str, Any] = {"mode": mode}
    t0 = time.perf_counter()
    _imports(mode)
    out["import_s"] = time.perf_counter() - t0
    snap = common.memory_snapshot()
    out["rss_after_import"], out["peak_after_import"] = snap["rss"], snap["ru_maxrss"]
    if mode == "import":
        out["peak_rss"] = snap["ru_maxrss"]
        out["vmhwm"] = snap["hwm"]
        return out

    import torch
    import transformers

    import quantplug
    from quantplug_rtn import RtnConfig

    torch.manual_seed(0)
    with _Sampler() as sampler:
        t0 = time.perf_counter()
        if mode in ("rtn4", "rtn4-mmap"):
            model = quantplug.load(ckpt, config=RtnConfig(**RTN), progress=False)
        elif mode == "bf16":
            model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
            model.eval()
        elif mode == "bnb4":
            from quantplug_bnb import BnbConfig

            model = quantplug.load(ckpt, config=BnbConfig(**BNB4), progress=False)
        elif mode == "hf-bnb4":
            hf_config = transformers.BitsAndBytesConfig(
                **{**BNB4, "bnb_4bit_compute_dtype": getattr(torch, BNB4["bnb_4bit_compute_dtype"])}
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                ckpt, quantization_config=hf_config, device_map="cpu", dtype=torch.bfloat16
            )
            model.eval()
        elif mode == "ao8":
            from quantplug_torchao import TorchaoConfig

            model = quantplug.load(ckpt, config=TorchaoConfig.from_mode("int8_weight_only"), progress=False)
        elif mode == "hf-ao8":
            from torchao.quantization import Int8WeightOnlyConfig
            from torchao.quantization.granularity import PerRow

            hf_config = transformers.TorchAoConfig(Int8WeightOnlyConfig(granularity=PerRow(), version=2))
            model = transformers.AutoModelForCausalLM.from_pretrained(
                ckpt, quantization_config=hf_config, device_map="cpu", dtype=torch.bfloat16
            )
            model.eval()
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        out["load_s"] = time.perf_counter() - t0
    snap = common.memory_snapshot()
    out["rss_after_load"], out["peak_after_load"], out["vmhwm_after_load"] = (
        snap["rss"],
        snap["ru_maxrss"],
        snap["hwm"],
    )
    out["load_rss_curve_mb"] = sampler.curve()

    # What the loaded model holds: every state_dict tensor, counted once.
    seen, total, by_dtype = set(), 0, {}
    for t in _plain_tensors(model.state_dict().values()):
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        n = t.numel() * t.element_size()
        total += n
        by_dtype[str(t.dtype).removeprefix("torch.")] = (
            by_dtype.get(str(t.dtype).removeprefix("torch."), 0) + n
        )
    out["weight_bytes"] = total
    out["weight_bytes_by_dtype"] = by_dtype
    info = getattr(model, "quantplug_info", None)  # quantplug.convert.INFO_ATTR
    if info is not None:
        out["quantized_modules"] = len(info.modules)
    out["modules"] = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})

    # One forward pass on a few tokens.
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids).logits
    out["forward_s"] = time.perf_counter() - t0
    ok = tuple(logits.shape) == (1, PROMPT_LEN, vocab) and bool(torch.isfinite(logits).all())
    out["forward_ok"] = ok
    out["argmax"] = logits.argmax(-1)[0].tolist()
    snap = common.memory_snapshot()
    out["rss_after_forward"], out["peak_rss"], out["vmhwm"] = snap["rss"], snap["ru_maxrss"], snap["hwm"]
    # Diagnostic, after every figure above is taken: how much of the RSS is memory the C allocator
    # has freed but kept (glibc returns it on malloc_trim); the rest is live data and code.
    out["rss_after_malloc_trim"] = _malloc_trim_rss()
    if not ok:
        raise SystemExit(
            f"forward pass failed: logits shape {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}"
        )
    return out


def _plain_tensors(tensors):
    """The plain tensors behind ``tensors``: a tensor subclass (torchao's weights) is flattened into
    its inner tensors, whose ``data_ptr`` identifies the storage (the wrapper's is 0 for all of them)."""
    for t in tensors:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            yield from _plain_tensors(getattr(t, n) for n in names if getattr(t, n) is not None)
        else:
            yield t


def _malloc_trim_rss() -> int | None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None  # not glibc
    return common.memory_snapshot()["rss"]


def child_main(args: argparse.Namespace) -> None:
    ckpt = Path(args.ckpt)
    if args.child == "generate":
        result = _child_generate(ckpt, json.loads(args.model_json))
    else:
        result = _child_measure(args.child, ckpt)
    common.emit_result(result)


# -- parent ---------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


MODES = ("import", "rtn4", "bf16", "rtn4-mmap", "bnb4", "hf-bnb4", "ao8", "hf-ao8")
MODE_ENV = {"rtn4-mmap": DIAGNOSTIC_ENV}
LABELS = {
    "import": "import only (torch, transformers, quantplug, quantplug_rtn)",
    "rtn4": "`quantplug.load(ckpt, config=RtnConfig(bits=4, group_size=128))` (quantize-on-load)",
    "bf16": "`AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)` (no quantization)",
    "rtn4-mmap": "diagnostic: the quantize-on-load above with `MALLOC_MMAP_THRESHOLD_=1048576`",
    "bnb4": "`quantplug.load(ckpt, config=BnbConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
    "bnb_4bit_compute_dtype='bfloat16'))`",
    "hf-bnb4": "`from_pretrained(ckpt, quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
    "bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.bfloat16), device_map='cpu', dtype=torch.bfloat16)`",
    "ao8": "`quantplug.load(ckpt, config=TorchaoConfig.from_mode('int8_weight_only'))`",
    "hf-ao8": "`from_pretrained(ckpt, quantization_config=TorchAoConfig(Int8WeightOnlyConfig(granularity=PerRow(), "
    "version=2)), device_map='cpu', dtype=torch.bfloat16)`",
}
SUMMARY_KEYS = (
    "peak_after_load",
    "peak_rss",
    "time_v_maxrss",
    "rss_after_import",
    "rss_after_load",
    "rss_after_forward",
    "rss_after_malloc_trim",
    "import_s",
    "load_s",
    "forward_s",
    "process_wall_s",
    "weight_bytes",
)


def _range(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if len(vals) < 2:
        return ""
    return f" ({min(vals) / common.GB:.2f}–{max(vals) / common.GB:.2f})"


def _row(mode: str, m: dict, runs: list[dict]) -> str:
    load_key = "peak_after_load" if "peak_after_load" in m else "peak_rss"
    dash = "–"
    return (
        f"| {LABELS[mode]} | {common.fmt_gb(m.get(load_key))}{_range(runs, load_key)} | "
        f"{common.fmt_gb(m.get('peak_rss'))}{_range(runs, 'peak_rss')} | "
        f"{common.fmt_gb(m['rss_after_malloc_trim']) if m.get('rss_after_malloc_trim') else dash} | "
        f"{common.fmt_s(m['load_s']) if 'load_s' in m else dash} | "
        f"{common.fmt_s(m['forward_s']) if 'forward_s' in m else dash} | "
        f"{common.fmt_gb(m['weight_bytes']) if m.get('weight_bytes') else dash} |"
    )


def results_markdown(data: dict) -> str:
    med, ck, mach, per_run = data["medians"], data["checkpoint"], data["machine"], data["per_run"]
    v = mach["versions"]
    cfg = ck["model"]
    rtn = med["rtn4"]
    verdict = "met" if data["goal"]["met_after_load"] else "NOT met"
    lines = [
        "## Quantize-on-load peak memory (rtn int4; bnb nf4 and torchao int8 vs Transformers)",
        "",
        f"Synthetic Llama, {ck['params'] / 1e9:.2f}B parameters (hidden {cfg['hidden_size']}, intermediate "
        f"{cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / "
        f"{cfg['num_key_value_heads']} KV heads, vocab {cfg['vocab_size']}, untied), random bf16 weights, "
        f"{common.fmt_gb(ck['checkpoint_bytes'])} of safetensors ({ck['layout']}, written by Transformers' "
        "`save_pretrained`). One fresh process per run and mode; peak RSS is the process's `ru_maxrss` "
        f"(interpreter and imports included); median of {data['runs']} run{'s' if data['runs'] != 1 else ''}, "
        "(min–max) in brackets. "
        f"Forward = one pass on {PROMPT_LEN} tokens, after the load. `after malloc_trim` = RSS once the forward "
        "is done and glibc has handed its freed memory back (what is really in use).",
        "",
        "| mode | peak RSS after load | peak RSS after forward | RSS after malloc_trim | load time | forward time "
        "| weights held |",
        "|---|---|---|---|---|---|---|",
        *(_row(mode, med[mode], per_run[mode]) for mode in data["modes"]),
        "",
        f"Goal (issue acceptance): quantize-on-load peak RSS under {GOAL_BYTES / 1e9:.1f} GB — **{verdict}** "
        f"({common.fmt_gb(rtn['peak_after_load'])} after load, {common.fmt_gb(rtn['peak_rss'])} after the forward "
        "pass, medians).",
    ]
    if rtn.get("weight_bytes") and med["import"].get("peak_rss"):
        base = med["import"]["peak_rss"] + rtn["weight_bytes"]
        text = (
            f"Where the memory goes: the quantized model holds {common.fmt_gb(rtn['weight_bytes'])} of tensors "
            f"and the imports take {common.fmt_gb(med['import']['peak_rss'])}, {common.fmt_gb(base)} together; the "
            f"peak after load is {common.fmt_gb(rtn['peak_after_load'] - base)} above that, and once glibc hands "
            f"back freed memory (`malloc_trim(0)`) the process is at {common.fmt_gb(rtn.get('rss_after_malloc_trim'))}."
        )
        if not data["goal"]["met_after_load"]:
            text += (
                " The excess is memory the load freed (each layer's bf16 read and its float32 quantization "
                "temporaries) that glibc malloc keeps: once a few large blocks have been freed its mmap threshold "
                "rises, later temporaries come from the heap between the quantized tensors that stay, and those "
                "holes are not returned. The amount varies from run to run."
            )
        if "rtn4-mmap" in med:
            text += (
                f" With every allocation over 1 MiB served by its own mmap (`rtn4-mmap` row) the same load peaks at "
                f"{common.fmt_gb(med['rtn4-mmap'].get('peak_after_load'))}."
            )
        lines += ["", text]
    lines += _versus_markdown(data)
    lines += [
        "",
        "The bf16 `from_pretrained` figure after load is low because Transformers maps the safetensors file and "
        "the weights become resident only when first touched (the forward pass); the `after forward` column is "
        "the one comparable with a model held in memory.",
        "",
        f"- Date: {data['date']}",
        f"- Command: `{data['command']}`",
        f"- Machine: {common.machine_line(mach)}; 1-minute load average {_la(data, 'start')} at the start, "
        f"{_la(data, 'end')} at the end (a shared machine: timings are noisy)",
        f"- Versions: Python {mach['python']}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"quantplug {v.get('quantplug')}, quantplug-rtn {v.get('quantplug-rtn')}"
        + "".join(
            f", {k} {v[k]}"
            for k in ("bitsandbytes", "quantplug-bnb", "torchao", "quantplug-torchao")
            if v.get(k)
        )
        + (f", code at git {mach['git_revision']}" if mach.get("git_revision") else "")
        + (f" (uncommitted diff sha256 {mach['git_diff_sha256']})" if mach.get("git_diff_sha256") else "")
        + (" — the code changed while it ran" if data.get("code_changed_during_run") else ""),
        f"- Raw figures: `bench/results/{NAME}.json`",
    ]
    return "\n".join(lines)


def _versus_markdown(data: dict) -> list[str]:
    versus, med = data.get("versus_transformers") or {}, data["medians"]
    if not versus:
        return []
    lines = [
        "",
        "### quantplug vs Transformers, same quantization on load",
        "",
        "Same checkpoint, same settings, each in a fresh process that imports what it needs (the backend "
        "library for both; quantplug and its plugin for quantplug) and runs one forward pass after the load "
        "(every weight touched). Ratio = quantplug / Transformers peak RSS after the forward (medians; per-run "
        f"ratios in brackets). Goal (issue 9): at most {GOAL_RATIO}x.",
        "",
        "| backend / mode | quantplug peak after load / after forward | Transformers peak after load / after "
        "forward | ratio | load time quantplug / Transformers | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for qp, vs in versus.items():
        hf = vs["transformers_mode"]
        q, h = med[qp], med[hf]
        runs = ", ".join(f"{r:.2f}" for r in vs["per_run_ratios_after_forward"])
        name = {"bnb4": "bitsandbytes nf4 (bf16 compute)", "ao8": "torchao int8 weight-only"}.get(qp, qp)
        lines.append(
            f"| {name} | {common.fmt_gb(q['peak_after_load'])} / {common.fmt_gb(q['peak_rss'])} | "
            f"{common.fmt_gb(h['peak_after_load'])} / {common.fmt_gb(h['peak_rss'])} | "
            f"**{vs['ratio_peak_after_forward']:.2f}x** ({runs}) — {'met' if vs['met'] else 'NOT met'} | "
            f"{common.fmt_s(q['load_s'])} / {common.fmt_s(h['load_s'])} | {vs['argmax_agreement']:.2f} |"
        )
    lines += [
        "",
        "Top-1 agreement: the share of the 8 positions where the two loads' logits pick the same token "
        "(1.00 = both did the same quantization).",
        "",
        "Where the difference comes from — peak after load minus what the process held after its imports and "
        "minus the quantized model's own tensors (medians), i.e. the memory the load itself needed on top:",
        "",
    ]
    for qp, vs in versus.items():
        parts = []
        for mode, who in ((qp, "quantplug"), (vs["transformers_mode"], "Transformers")):
            m = med[mode]
            if m.get("weight_bytes") and m.get("rss_after_import"):
                extra = m["peak_after_load"] - m["rss_after_import"] - m["weight_bytes"]
                parts.append(f"{who} {common.fmt_gb(extra)} (model {common.fmt_gb(m['weight_bytes'])})")
        if parts:
            lines.append(f"- {qp}: " + ", ".join(parts))
    lines += [
        "",
        "quantplug reads the checkpoint one tensor at a time and quantizes each layer as it is read (then frees "
        "its full-precision copy), so the load needs little beyond the quantized model; Transformers' "
        "quantize-on-load holds gigabytes more at its peak (above), as BACKENDS.md measured on this model.",
    ]
    if "bnb4" in versus:
        q, h = med["bnb4"], med[versus["bnb4"]["transformers_mode"]]
        if q.get("rss_after_malloc_trim") and h.get("rss_after_malloc_trim"):
            lines += [
                "",
                f"The forward pass of the quantplug-loaded bnb model rises {common.fmt_gb(q['peak_rss'] - q['peak_after_load'])} "
                f"above its after-load peak, and is back at {common.fmt_gb(q['rss_after_malloc_trim'])} after "
                "`malloc_trim`: transient memory, not held (which allocations make it up is not traced here; "
                "bitsandbytes' CPU forward dequantizes every weight on every call). The Transformers-loaded "
                "model's forward can reuse memory its load freed but kept (its after-load peak is "
                f"{common.fmt_gb(h['peak_after_load'] - h['rss_after_malloc_trim'])} above its RSS after "
                "`malloc_trim`), so its forward adds little. The ratio uses the after-forward peaks, the larger "
                "of each.",
            ]
    return lines


def _la(data: dict, when: str) -> str:
    la = data["load_average"][when]
    return f"{la[0]:.1f}" if la else "n/a"


def _command(argv: list[str]) -> str:
    """The command line that produced the results (without --json-out, which changes nothing)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json-out":
            skip = True
        elif not a.startswith("--json-out="):
            keep.append(a)
    return shlex.join(["python", "bench/quantize_on_load.py", *keep])


def _agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parent_main(args: argparse.Namespace, argv: list[str]) -> int:
    cache_dir = Path(args.cache_dir)
    if not cache_dir.is_absolute():
        cache_dir = common.REPO_ROOT / cache_dir
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    label = "quick" if args.quick else "1b"
    model_cfg = QUICK_MODEL if args.quick else FULL_MODEL
    record = not args.quick and not args.no_record
    modes = [m for m in MODES if not (args.no_diagnostic and m in MODE_ENV)]
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
        if not {"import", "rtn4", "bf16"} <= set(modes):
            record = False  # the recorded section needs the rtn figure and its references

    ckpt, ck_meta = ensure_checkpoint(cache_dir, model_cfg, label)
    _log(
        f"checkpoint {ckpt}: {ck_meta['params'] / 1e9:.3f}B params, {common.fmt_gb(ck_meta['checkpoint_bytes'])} "
        f"({ck_meta['layout']})"
    )
    _warm_page_cache(ckpt)
    load_start = _loadavg()
    # Taken before the runs: the code measured is the code at this revision (and uncommitted diff).
    machine = common.machine_info(
        (
            "torch",
            "transformers",
            "accelerate",
            "safetensors",
            "quantplug",
            "quantplug-rtn",
            "bitsandbytes",
            "quantplug-bnb",
            "torchao",
            "quantplug-torchao",
        )
    )

    per_mode: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(runs):
        for mode in modes:  # interleaved, so slow drifts of a noisy machine spread over all modes
            r = common.run_child(
                [__file__, "--child", mode, "--ckpt", str(ckpt)], timeout=3600, env=MODE_ENV.get(mode)
            )
            per_mode[mode].append(r)
            after_load = r.get("peak_after_load", r["peak_rss"])
            extra = ""
            if "load_s" in r:
                extra = f", load {r['load_s']:.1f} s, after forward {common.fmt_gb(r['peak_rss'])}"
                extra += f", after malloc_trim {common.fmt_gb(r.get('rss_after_malloc_trim'))}"
            _log(f"run {i + 1}/{runs} {mode:9s}: peak RSS after load {common.fmt_gb(after_load)}{extra}")

    med = {}
    for mode, rs in per_mode.items():
        keys = [k for k in SUMMARY_KEYS if any(k in r for r in rs)]
        med[mode] = common.medians(rs, keys)
    rtn = med.get("rtn4", {})
    code_changed = (common.git_revision(), common.git_diff_hash()) != (
        machine["git_revision"],
        machine["git_diff_sha256"],
    )
    if code_changed:
        _log(
            "warning: the repository's code changed while the benchmark ran; the recorded revision is the one at the start"
        )
    versus = {}
    for qp, hf in VERSUS.items():
        if qp in med and hf in med:
            versus[qp] = {
                "transformers_mode": hf,
                "ratio_peak_after_forward": med[qp]["peak_rss"] / med[hf]["peak_rss"],
                "ratio_peak_after_load": med[qp]["peak_after_load"] / med[hf]["peak_after_load"],
                "per_run_ratios_after_forward": [
                    x["peak_rss"] / y["peak_rss"] for x, y in zip(per_mode[qp], per_mode[hf])
                ],
                "argmax_agreement": _agreement(per_mode[qp][0]["argmax"], per_mode[hf][0]["argmax"]),
                "goal_ratio": GOAL_RATIO,
            }
            versus[qp]["met"] = versus[qp]["ratio_peak_after_forward"] <= GOAL_RATIO
    data = {
        "benchmark": NAME,
        "date": common.now_iso(),
        "command": _command(argv),
        "machine": machine,
        "code_changed_during_run": code_changed,
        "load_average": {"start": load_start, "end": _loadavg()},
        "checkpoint": {**ck_meta, "path": os.path.relpath(ckpt, common.REPO_ROOT)},
        "quant_config": {"quant_method": "rtn", **RTN},
        "rss_source": "peak_* = ru_maxrss of the child (== /proc/self/status VmHWM), bytes; time_v_maxrss = "
        "/usr/bin/time -v from outside; rss_* = VmRSS at that point",
        "modes": modes,
        "mode_env": {m: MODE_ENV[m] for m in modes if m in MODE_ENV},
        "goal": {
            "peak_rss_below_bytes": GOAL_BYTES,
            "rtn4_peak_after_load": rtn.get("peak_after_load"),
            "rtn4_peak_after_forward": rtn.get("peak_rss"),
            "met_after_load": bool(rtn) and rtn["peak_after_load"] < GOAL_BYTES,
            "met_after_forward": bool(rtn) and rtn["peak_rss"] < GOAL_BYTES,
        },
        "argmax_agreement_rtn4_vs_bf16": (
            _agreement(per_mode["rtn4"][0]["argmax"], per_mode["bf16"][0]["argmax"])
            if "rtn4" in per_mode and "bf16" in per_mode
            else None
        ),
        "versus_transformers": versus,
        "runs": runs,
        "medians": med,
        "per_run": per_mode,
    }

    _log("")
    _log(
        f"{'mode':10s} {'peak after load':>16s} {'peak after fwd':>15s} {'after trim':>11s} {'load':>8s} {'weights':>10s}"
    )
    for mode in modes:
        m = med[mode]
        _log(
            f"{mode:10s} {common.fmt_gb(m.get('peak_after_load', m['peak_rss'])):>16s} "
            f"{common.fmt_gb(m['peak_rss']):>15s} {common.fmt_gb(m.get('rss_after_malloc_trim')):>11s} "
            f"{common.fmt_s(m.get('load_s')):>8s} {common.fmt_gb(m.get('weight_bytes')):>10s}"
        )
    if rtn:
        verdict = "met" if data["goal"]["met_after_load"] else "NOT met"
        _log(
            f"goal: quantize-on-load peak RSS < {GOAL_BYTES / 1e9} GB: {verdict} ({common.fmt_gb(rtn['peak_after_load'])})"
        )
    for qp, vs in versus.items():
        _log(
            f"{qp} vs {vs['transformers_mode']}: peak RSS ratio {vs['ratio_peak_after_forward']:.2f}x after forward "
            f"(goal <= {GOAL_RATIO}: {'met' if vs['met'] else 'NOT met'}), argmax agreement {vs['argmax_agreement']:.2f}"
        )
    if args.quick:
        _log("(--quick: the goal applies to the full-size model only)")
    if record:
        out = common.write_json(common.RESULTS_DIR / f"{NAME}.json", data)
        md = common.update_results_section(NAME, results_markdown(data))
        _log(f"recorded {os.path.relpath(out, common.REPO_ROOT)} and {os.path.relpath(md, common.REPO_ROOT)}")
    else:
        _log("not recorded (--quick / --no-record)")
    if args.json_out:
        common.write_json(args.json_out, data)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cache-dir",
        default="bench/.cache",
        help="where the generated checkpoint is cached (default %(default)s)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="fresh processes per mode; the median is reported (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a tiny model, for a smoke test in seconds; records nothing"
    )
    p.add_argument("--no-record", action="store_true", help="do not write bench/results/ or bench/RESULTS.md")
    p.add_argument("--no-diagnostic", action="store_true", help="skip the rtn4-mmap diagnostic mode")
    p.add_argument(
        "--modes",
        help=f"comma list of modes to run (default all: {', '.join(MODES)}); records only with import,rtn4,bf16",
    )
    p.add_argument("--json-out", help="also write the full results JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--model-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if args.runs is not None and args.runs < 1:
        p.error("--runs must be at least 1")
    return parent_main(args, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
