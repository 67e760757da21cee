"""The zoo: compressed-tensors checkpoints written by the field's own tools, made here at test time
from a tiny random Llama (bfloat16, as these tools are run), each loaded by ``quantplug.load`` with
the logits of the format's reference reader, or refused by name.

- auto-round 0.16's ``quantize_and_save(format="llm_compressor")`` (W4 group 128, symmetric and
  asymmetric): it stores float16 scales for a bfloat16 model.
- llm-compressor 0.14.0.1's ``oneshot`` recipes (tests/write_llmcompressor.py, in a child process
  with its own compressed-tensors 0.19.0 first on the path): GPTQ W4A16, AWQ W4A16 symmetric and
  asymmetric (``zp_dtype: torch.int8``), SmoothQuant + GPTQ W8A8, plain W8A8, FP8 dynamic and static.
- each of these loaded by Transformers and saved again with ``save_pretrained``, where Transformers
  loads it on CPU (it refuses asymmetric pack-quantized folders).

The reference: compressed-tensors 0.20's own load in float32 (apply the stored config to a fresh
model, ``compress_model``, load the tensors, ``decompress_model``, run); Transformers' own logits
too where it loads the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_interop import library_logits  # compressed-tensors' own load, the reference

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids

HERE = Path(__file__).parent
#: a folder holding llm-compressor 0.14.0.1 and its compressed-tensors 0.19.0 (the tox env installs it)
LLMCOMPRESSOR_PATH = os.environ.get("QUANTPLUG_LLMCOMPRESSOR_PATH")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

AUTO_ROUND = {"autoround_w4g128": {"sym": True}, "autoround_w4g128_asym": {"sym": False}}
LLMCOMPRESSOR = [
    "gptq_w4a16",
    "awq_w4a16",
    "awq_w4a16_asym",
    "smoothquant_gptq_w8a8",
    "w8a8",
    "fp8_dynamic",
    "fp8_static",
]
#: Transformers 5.25 refuses asymmetric pack-quantized folders (weight_zero_point's packed shape);
#: test_interop.py holds that to the library
TRANSFORMERS_REFUSES = {"autoround_w4g128_asym", "awq_w4a16_asym"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


_TRANSFORMERS = textwrap.dedent(
    """
    import sys, json, torch
    from pathlib import Path
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    ids = load_file(sys.argv[1])["ids"]
    report = {}
    for folder in map(Path, sys.argv[2:]):
        try:
            # as a user does: the stored dtype (bfloat16), then saved again
            AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder.parent / (folder.name + "_transformers"))
            out = {}
            for dtype in (torch.float32, torch.bfloat16):
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
                with torch.no_grad():
                    out[str(dtype)] = model(ids).logits.float().contiguous()
            save_file(out, folder.parent / (folder.name + "_logits.safetensors"))
            report[folder.name] = None
        except Exception as exc:
            report[folder.name] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps(report))
    """
)


def _through_transformers(folders: list[Path], tmp: Path) -> dict[str, str | None]:
    """In a fresh process (no quantplug plugin imported): Transformers loads each folder, saves it
    again as ``<name>_transformers`` and writes its logits (float32 and bfloat16) as
    ``<name>_logits.safetensors``; the answer maps each name to None or Transformers' refusal."""
    save_file({"ids": token_ids()}, tmp / "ids.safetensors")
    run = subprocess.run(
        [sys.executable, "-c", _TRANSFORMERS, str(tmp / "ids.safetensors"), *map(str, folders)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _auto_round(out: Path, name: str, sym: bool) -> Path:
    """auto-round's own API, no quantplug: W4 group 128 on a bfloat16 model, llm-compressor's format."""
    from auto_round import AutoRound

    model = tiny_llama().to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.dtype = torch.bfloat16
    tokenizer = types.SimpleNamespace(pad_token_id=None, pad_token=None)  # the dataset is token ids
    ar = AutoRound(
        model,
        tokenizer,
        bits=4,
        group_size=128,
        sym=sym,
        iters=2,
        nsamples=4,
        seqlen=32,
        dataset=[token_ids(shape=(1, 32), seed=10 + i) for i in range(4)],
        device_map="cpu",
        enable_torch_compile=False,
    )
    ar.quantize_and_save(str(out / "auto-round" / name), format="llm_compressor")
    return next(p.parent for p in (out / "auto-round" / name).rglob("config.json")).rename(out / name)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    """name -> (folder, None or Transformers' refusal); ``<name>_transformers`` entries are the
    folders Transformers saved again."""
    out = tmp_path_factory.mktemp("zoo")
    folders = {name: _auto_round(out, name, **settings) for name, settings in AUTO_ROUND.items()}
    if LLMCOMPRESSOR_PATH is not None:
        run = subprocess.run(
            [sys.executable, str(HERE / "write_llmcompressor.py"), str(out / "llmc"), *LLMCOMPRESSOR],
            capture_output=True,
            text=True,
            env={**ENV, "PYTHONPATH": LLMCOMPRESSOR_PATH},
        )
        assert run.returncode == 0, run.stderr[-3000:]
        folders.update({name: out / "llmc" / name for name in LLMCOMPRESSOR})
    report = _through_transformers(list(folders.values()), out)
    zoo = {}
    for name, folder in folders.items():
        zoo[name] = (folder, report[folder.name])
        if report[folder.name] is None:
            zoo[f"{name}_transformers"] = (folder.parent / f"{folder.name}_transformers", None)
    return zoo


def _entry(zoo, name):
    if name not in zoo and LLMCOMPRESSOR_PATH is None and name.split("_transformers")[0] in LLMCOMPRESSOR:
        pytest.skip(
            "QUANTPLUG_LLMCOMPRESSOR_PATH is not set (the compressed_tensors tox env installs llm-compressor)"
        )
    return zoo[name]


NAMES = [*AUTO_ROUND, *LLMCOMPRESSOR]
SAVED_AGAIN = [f"{n}_transformers" for n in NAMES if n not in TRANSFORMERS_REFUSES]


@pytest.mark.parametrize("name", NAMES + SAVED_AGAIN)
def test_loads_with_the_reference_readers_logits(zoo, name):
    folder, _ = _entry(zoo, name)
    ids = token_ids()
    model = quantplug.load(folder, dtype=torch.float32, progress=False)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "CompressedTensorsLinear"
    assert _rel(logits(model, ids), library_logits(folder, ids)) < 1e-4


@pytest.mark.parametrize("name", [n for n in NAMES if n not in TRANSFORMERS_REFUSES])
def test_loads_with_transformers_logits_in_float32_and_the_stored_bfloat16(zoo, name):
    """Transformers' own load of the writer's folder: float32, and the folder's own dtype (bfloat16,
    quantplug.load's default), where Transformers casts float16 scales (auto-round's) to bfloat16."""
    folder, refusal = _entry(zoo, name)
    assert refusal is None
    ids = token_ids()
    theirs = load_file(folder.parent / f"{folder.name}_logits.safetensors")
    ours = quantplug.load(folder, dtype=torch.float32, progress=False)
    assert _rel(logits(ours, ids), theirs["torch.float32"]) < 1e-4
    ours = quantplug.load(folder, progress=False, kernel="none")  # compressed-tensors' own layers
    assert ours.model.layers[0].mlp.down_proj.weight_scale.dtype == torch.bfloat16
    assert _rel(logits(ours, ids).float(), theirs["torch.bfloat16"]) < 1e-2
    ours = quantplug.load(folder, progress=False)  # weight-only int4 grids: on torch's int4 CPU kernel
    if name.endswith(("w4a16", "w4g128")):
        assert set(quantplug.kernel_choices(ours).values()) == {"torch-int4-cpu"}
    assert _rel(logits(ours, ids).float(), theirs["torch.bfloat16"]) < 1e-2


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_REFUSES))
def test_transformers_refuses_asymmetric_pack_quantized(zoo, name):
    """Where Transformers cannot load the folder, compressed-tensors' own load is the reference
    (test_loads_with_the_reference_readers_logits); this holds the exclusion to Transformers."""
    _, refusal = _entry(zoo, name)
    assert refusal is not None and "mismatched_sizes" in refusal  # weight_zero_point's shape


def test_stored_scale_dtypes_are_the_tools_own(zoo):
    """What the zoo is about: auto-round stores float16 scales for a bfloat16 model, llm-compressor
    records asymmetric zero points as zp_dtype torch.int8 and its observers in the config."""
    folder, _ = zoo["autoround_w4g128"]
    state = load_file(next(folder.glob("*.safetensors")))
    assert state["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float16
    if LLMCOMPRESSOR_PATH is None:
        pytest.skip(
            "QUANTPLUG_LLMCOMPRESSOR_PATH is not set (the compressed_tensors tox env installs llm-compressor)"
        )
    folder, _ = zoo["awq_w4a16_asym"]
    weights = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"
    ]["weights"]
    assert weights["zp_dtype"] == "torch.int8" and weights["observer"] == "memoryless_minmax"


@pytest.mark.parametrize("name", ["autoround_w4g128", "awq_w4a16_asym"])
def test_saved_again_by_quantplug_keeps_the_config_and_the_logits(zoo, name, tmp_path):
    folder, _ = _entry(zoo, name)
    ids = token_ids()
    model = quantplug.load(folder, dtype=torch.float32, progress=False)
    again = quantplug.save(model, tmp_path / "again")
    ours = json.loads((again / "config.json").read_text())["quantization_config"]
    theirs = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert ours["config_groups"] == theirs["config_groups"]
    assert _rel(library_logits(again, ids), logits(model, ids)) < 1e-4
