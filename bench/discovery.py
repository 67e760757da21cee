"""Discovery cost: a fresh-process ``quantplug list`` with every installed plugin, against what a
Transformers user pays to reach its quantizer registry
(``from transformers.quantizers import AutoHfQuantizer``, which imports every installed backend).

Each figure is the median wall time of ``--runs`` fresh processes (interpreter start-up
included), the two measured alternately so machine noise hits both. The ``list`` child also
reports which heavy modules it imported (none of torch, transformers or any backend library may
be). Writes bench/results/discovery.json and the ``discovery`` section of bench/RESULTS.md.

    python bench/discovery.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

HEAVY = ("torch", "transformers", "bitsandbytes", "hqq", "optimum", "torchao", "numpy")
GOAL_SECONDS, GOAL_RATIO = 0.3, 25.0

LIST_CHILD = f"""
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from quantplug.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["list", "--json"], standalone_mode=False)
    except SystemExit:
        pass
listed = json.loads(out.getvalue())
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({list(HEAVY)!r}))
print(json.dumps({{"backends": [b["name"] for b in listed["backends"]],
                  "available": [b["name"] for b in listed["backends"] if b["available"]],
                  "heavy_imported": heavy, "in_process_s": time.perf_counter() - t0}}))
"""
HF_CHILD = "from transformers.quantizers import AutoHfQuantizer"


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)[:60]}... failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    info = common.machine_info(
        (
            "quantplug",
            "transformers",
            "torch",
            "quantplug-rtn",
            "quantplug-bnb",
            "quantplug-hqq",
            "quantplug-quanto",
            "quantplug-torchao",
        )
    )
    list_s, hf_s, child = [], [], None
    for _ in range(args.runs):
        wall, out = timed(["-c", LIST_CHILD])
        list_s.append(wall)
        child = json.loads(out.strip().splitlines()[-1])
        hf_s.append(timed(["-c", HF_CHILD])[0])
    med_list, med_hf = common.median(list_s), common.median(hf_s)
    ratio = med_hf / med_list
    result = {
        "date": common.now_iso(),
        "machine": info,
        "runs": args.runs,
        "quantplug_list_s": list_s,
        "transformers_auto_hf_quantizer_s": hf_s,
        "median_quantplug_list_s": med_list,
        "median_transformers_s": med_hf,
        "ratio": ratio,
        "backends_listed": child["backends"],
        "backends_available": child["available"],
        "heavy_modules_imported_by_list": child["heavy_imported"],
        "goal": {"seconds": GOAL_SECONDS, "ratio": GOAL_RATIO},
    }
    common.write_json(common.RESULTS_DIR / "discovery.json", result)
    met = med_list <= GOAL_SECONDS and ratio >= GOAL_RATIO and not child["heavy_imported"]
    body = f"""## Discovery: `quantplug list` vs Transformers' quantizer registry

Fresh process each, interpreter start-up included; median of {args.runs} runs, the two commands alternating.

| command | median wall time |
|---|---|
| `quantplug list --json` ({len(child["backends"])} backends: {", ".join(child["backends"]) or "none"}) | {med_list:.3f} s |
| `python -c "from transformers.quantizers import AutoHfQuantizer"` | {med_hf:.2f} s |

Ratio {ratio:.0f}x. Heavy modules imported by `list`: {", ".join(child["heavy_imported"]) or "none"} (checked: {", ".join(HEAVY)}).
Goal (issue 9): at most {GOAL_SECONDS} s and at least {GOAL_RATIO:.0f}x faster, importing no torch or backend module — **{"met" if met else "NOT met"}**.

- Date: {result["date"]}
- Command: `python bench/discovery.py --runs {args.runs}`
- Machine: {common.machine_line(info)}
- Versions: {", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)} (git {info["git_revision"]})
- Raw figures: `bench/results/discovery.json`
"""
    common.update_results_section("discovery", body)
    print(body)


if __name__ == "__main__":
    main()
