#!/usr/bin/env bash
# One device call: install what the GPU machine lacks, then every GPU figure and check.
#
#   bash bench/gpu_run.sh            # on the device machine, from the repository root, .whl carried
#
# The machine has no network: the backend libraries come as wheels in .whl/ (bitsandbytes 0.50.2
# slimmed to its CUDA 13 libraries, hqq 0.2.8.post1, optimum-quanto 0.2.7, torchao 0.18.0,
# termcolor), installed with --target /tmp/site + PYTHONPATH; the core and the five plugins are
# installed editable from this working tree (fallback: dist-info shims + PYTHONPATH, so the
# entry points are found either way). Then, each step under a hard time limit and each run
# whatever the previous ones did:
#   1. python bench/gpu.py --out $OUT      -> $OUT/gpu.json, $OUT/gpu.md   (the issue-9 figure)
#   2. pytest plugins/bnb/tests -k cuda    (bitsandbytes on CUDA: quantize, save, load)
#   3. python plugins/torchao/bench/gpu_check.py -> $OUT/torchao_gpu_check.json
#   4. the conformance kit's device-dependent tests of every plugin with device = "cuda" (the
#      fresh-process reload test is left out: the kit reloads without a device argument)
# Everything printed also goes to $OUT/run.log; $OUT/summary.txt has one line per step.
# Total hard limit: GPU_RUN_TOTAL seconds (default 420); each step also has its own.

set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/.cache/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${GPU_RUN_SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
DEADLINE=$((START + ${GPU_RUN_TOTAL:-420}))
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

# step NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, time left) seconds, records its status.
step() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((DEADLINE - $(date +%s) - 5))
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "=== $name: SKIPPED (total time limit reached)" | tee -a "$SUMMARY"
        return 0
    fi
    echo "=== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@"
    rc=$?
    local what="rc=$rc"
    ((rc == 124 || rc == 137)) && what="TIMEOUT after ${limit}s"
    echo "=== $name: $what in $(($(date +%s) - t0))s" | tee -a "$SUMMARY"
    return 0
}

# GPU_RUN_STEPS: a comma list of the steps to run after the install (default: all four).
want() { [[ ",${GPU_RUN_STEPS:-bench,bnb,torchao,conformance}," == *",$1,"* ]]; }

main() {
echo "=== start $(date -u +%FT%TZ) in $ROOT, python $($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# -- install ------------------------------------------------------------------------------------
mkdir -p "$SITE"
if ls .whl/*.whl >/dev/null 2>&1; then
    step install-wheels 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl
else
    echo "=== install-wheels: no .whl/ here (name .whl in carry)" | tee -a "$SUMMARY"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

PROJECTS=(. plugins/rtn plugins/bnb plugins/hqq plugins/quanto plugins/torchao)
editable=()
for p in "${PROJECTS[@]}"; do editable+=(-e "$p"); done
step install-editable 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "${editable[@]}"

backends_ok() {
    "$PY" - <<'EOF'
import sys
import quantplug
names = sorted(b.name for b in quantplug.backends())
print("quantplug backends:", names, "from", quantplug.__file__)
sys.exit(0 if len(names) >= 5 else 1)
EOF
}
if ! backends_ok; then
    # Fallback: a dist-info (METADATA + entry_points.txt) per project in $SITE, sources on PYTHONPATH.
    echo "=== editable install not usable: writing dist-info shims into $SITE" | tee -a "$SUMMARY"
    SRC=$("$PY" - "$SITE" "${PROJECTS[@]}" <<'EOF'
import sys, tomllib
from pathlib import Path

site, dirs = Path(sys.argv[1]), []
for proj in sys.argv[2:]:
    meta = tomllib.loads((Path(proj) / "pyproject.toml").read_text())
    proj_meta = meta["project"]
    name, version = proj_meta["name"], proj_meta["version"]
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = dict(proj_meta.get("entry-points", {}))
    if proj_meta.get("scripts"):
        groups["console_scripts"] = proj_meta["scripts"]
    (info / "entry_points.txt").write_text(
        "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items())
    )
    packages = meta.get("tool", {}).get("setuptools", {}).get("packages", [])
    where = packages.get("find", {}).get("where", ["."]) if isinstance(packages, dict) else ["."]
    dirs += [str((Path(proj) / w).resolve()) for w in where]
print(":".join(dirs))
EOF
)
    export PYTHONPATH=$SRC:$PYTHONPATH
    backends_ok || echo "=== WARNING: quantplug still does not see 5 backends" | tee -a "$SUMMARY"
fi

# -- versions and the device --------------------------------------------------------------------
step nvidia-smi 30 nvidia-smi
step versions 60 "$PY" - <<'EOF'
from importlib import metadata
import torch
for n in ("torch", "transformers", "accelerate", "bitsandbytes", "hqq", "optimum-quanto", "torchao", "quantplug",
          "quantplug-rtn", "quantplug-bnb", "quantplug-hqq", "quantplug-quanto", "quantplug-torchao"):
    try:
        print(f"{n} {metadata.version(n)}")
    except metadata.PackageNotFoundError:
        print(f"{n} MISSING")
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
step quantplug-list 60 "$PY" -c "from quantplug.cli import main; main(['list'])"

# -- 1. the issue-9 figure ------------------------------------------------------------------------
want bench && step gpu-bench 260 "$PY" bench/gpu.py --out "$OUT" --budget 230 --mode-timeout 75

# -- 2. bitsandbytes on CUDA ------------------------------------------------------------------------
want bnb && step bnb-cuda-tests 60 "$PY" -m pytest plugins/bnb/tests/test_bnb.py -q -rfE -k cuda -p no:cacheprovider

# -- 3. torchao on CUDA -----------------------------------------------------------------------------
want torchao && step torchao-gpu-check 80 "$PY" plugins/torchao/bench/gpu_check.py --out "$OUT/torchao_gpu_check.json"

# -- 4. the conformance kit on CUDA -----------------------------------------------------------------
CONF=/tmp/cuda_conformance
mkdir -p "$CONF"
cat >"$CONF/test_cuda_conformance.py" <<'EOF'
"""Every plugin's conformance classes, re-run with device = "cuda" (the kit's class variable)."""
import importlib.util
from pathlib import Path

ROOT = Path(__import__("os").environ["QP_ROOT"])
for plugin in ("rtn", "bnb", "hqq", "quanto", "torchao"):
    path = ROOT / "plugins" / plugin / "tests" / "test_conformance.py"
    spec = importlib.util.spec_from_file_location(f"_conformance_{plugin}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, obj in vars(module).items():
        if isinstance(obj, type) and name.startswith("Test") and obj.__module__ == module.__name__:
            device = __import__("os").environ.get("QP_CONFORMANCE_DEVICE", "cuda")
            globals()[f"TestCuda{name[4:]}"] = type(f"TestCuda{name[4:]}", (obj,), {"device": device})
EOF
export QP_ROOT=$ROOT
want conformance && step conformance-cuda "${GPU_RUN_CONFORMANCE_S:-80}" "$PY" -m pytest "$CONF/test_cuda_conformance.py" -q -rfE --tb=line \
    -p no:cacheprovider --rootdir "$CONF" -k "registered or layer_error or quantize_model or corrupt" -o addopts=""

echo "=== done in $(($(date +%s) - START))s"
cat "$SUMMARY"
}

main 2>&1 | tee -a "$OUT/run.log"
