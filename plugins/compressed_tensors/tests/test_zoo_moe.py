"""The MoE zoo: compressed-tensors checkpoints of tiny mixture-of-experts models (Qwen3-MoE, Mixtral;
``quantplug.testing_models.tiny_moe``) written at test time by llm-compressor 0.14.0.1
(tests/write_llmcompressor_moe.py, in a child process with its own compressed-tensors 0.19.0): it
linearizes the experts of Transformers 5's stacked experts modules into one Linear per expert
projection and stores them per expert (``...experts.{e}.gate_proj.weight_packed``, ...).

Each loads with ``quantplug.load`` with every expert projection a compressed-tensors quantized module
and the reference's logits: compressed-tensors' own compressor (the stored format's) decompresses
every stored module, and Transformers loads that dense per-expert checkpoint (its conversion mapping
stacks the experts) and runs it, in float32.

Mixtral: llm-compressor 0.14 stores its experts as ``block_sparse_moe.experts.{e}.gate_proj`` / ``up_proj``
/ ``down_proj``, not the ``w1`` / ``w3`` / ``w2`` that Transformers' Mixtral mapping (and so
quantplug) reads; Transformers 5.25 leaves those experts randomly initialised. The same tensors under
Transformers' names (a hand-built folder) load with the reference's logits.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file, save_file
from test_zoo import ENV, HERE, LLMCOMPRESSOR_PATH, _rel
from transformers import AutoModelForCausalLM

import quantplug
from quantplug import CheckpointError
from quantplug.testing import logits, token_ids

pytestmark = pytest.mark.skipif(
    LLMCOMPRESSOR_PATH is None,
    reason="QUANTPLUG_LLMCOMPRESSOR_PATH is not set (the compressed_tensors tox env installs llm-compressor)",
)

#: name -> (arch, llm-compressor preset): W4A16 is group 128 (two groups of the hidden size 256)
WRITTEN = {
    "qwen3_moe_w4a16": ("qwen3_moe", "W4A16"),
    "qwen3_moe_w8a16": ("qwen3_moe", "W8A16"),
    "qwen3_moe_fp8_weight": ("qwen3_moe", "FP8_WEIGHT"),
    "mixtral_w4a16": ("mixtral", "W4A16"),
}
#: llm-compressor's Mixtral tensors renamed to Transformers' per-expert names
MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
LOADABLE = ["qwen3_moe_w4a16", "qwen3_moe_w8a16", "qwen3_moe_fp8_weight", "mixtral_w4a16_w1w3w2"]
SITE = {"qwen3_moe": "mlp.experts", "mixtral": "block_sparse_moe.experts"}
LAYERS, EXPERTS = 2, 8


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _hand_built(folder: Path, out: Path) -> Path:
    """``folder``'s tensors with Mixtral's experts under Transformers' names (w1 / w3 / w2)."""
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    pattern = re.compile(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)\.")
    renamed = {
        pattern.sub(lambda m: m[1] + MIXTRAL_NAMES[m[2]] + ".", k): v for k, v in _stored(folder).items()
    }
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("zoo_moe")
    run = subprocess.run(
        [
            sys.executable,
            str(HERE / "write_llmcompressor_moe.py"),
            str(out),
            *(":".join(v) for v in WRITTEN.values()),
        ],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": LLMCOMPRESSOR_PATH},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    zoo = {name: out / name for name in WRITTEN}
    zoo["mixtral_w4a16_w1w3w2"] = _hand_built(zoo["mixtral_w4a16"], out / "mixtral_w4a16_w1w3w2")
    return zoo


def _decompressed(folder: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor, each quantized module's decompressed to a float32 ``weight`` by
    compressed-tensors' compressor for the stored format (scales in float32, as a float32 model
    holds them)."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    state = _stored(folder)
    modules = [k.removesuffix(".weight_scale") for k in state if k.endswith(".weight_scale")]
    for module in modules:
        local = {k[len(module) + 1 :]: state.pop(k) for k in list(state) if k.rpartition(".")[0] == module}
        local["weight_scale"] = local["weight_scale"].float()
        state[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"].float()
    return state


def reference_logits(folder: Path, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    """compressed-tensors' decompression of ``folder``, loaded and run by Transformers in float32
    (every tensor must find its place: none missing, none left over)."""
    dense = tmp / f"{folder.name}_decompressed"
    dense.mkdir()
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (dense / "config.json").write_text(json.dumps(config))
    save_file(_decompressed(folder), dense / "model.safetensors", metadata={"format": "pt"})
    model, info = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    return logits(model.eval(), ids)


def _arch(name: str) -> str:
    return "mixtral" if name.startswith("mixtral") else "qwen3_moe"


@pytest.mark.parametrize("name", list(WRITTEN))
def test_llmcompressor_stores_every_expert_per_expert(zoo, name):
    """What llm-compressor writes: per-expert weight_packed / weight_scale / weight_shape (W4A16,
    W8A16: pack-quantized) or an fp8 weight and its scale (FP8 weights per channel) for each of the 8 experts'
    3 projections, no stacked experts tensor, routers in bfloat16 and in ``ignore``."""
    arch, scheme = WRITTEN[name]
    state = _stored(zoo[name])
    suffixes = (
        ["weight", "weight_scale"]
        if scheme == "FP8_WEIGHT"
        else ["weight_packed", "weight_scale", "weight_shape"]
    )
    experts = {k for k in state if ".experts." in k}
    expected = {
        f"model.layers.{i}.{SITE[arch]}.{e}.{proj}.{s}"
        for i in range(LAYERS)
        for e in range(EXPERTS)
        for proj in ("gate_proj", "up_proj", "down_proj")  # Mixtral too: not w1 / w3 / w2
        for s in suffixes
    }
    assert experts == expected
    router = f"model.layers.0.{SITE[arch].rpartition('.')[0]}.gate"
    assert state[f"{router}.weight"].dtype == torch.bfloat16
    qc = json.loads((zoo[name] / "config.json").read_text())["quantization_config"]
    assert router in qc["ignore"] and qc["quantization_status"] == "compressed"
    packed = state[f"model.layers.1.{SITE[arch]}.7.down_proj.{suffixes[0]}"]
    assert (
        packed.dtype
        == {"W4A16": torch.int32, "W8A16": torch.int32, "FP8_WEIGHT": torch.float8_e4m3fn}[scheme]
    )


def _expert_modules(model) -> dict[str, str]:
    """Every module under an experts site that holds a weight: name -> class name."""
    return {
        n: type(m).__name__
        for n, m in model.named_modules()
        if ".experts." in n and (hasattr(m, "weight") or hasattr(m, "weight_packed"))
    }


@pytest.mark.parametrize("name", LOADABLE)
def test_loads_every_expert_quantized_with_the_reference_logits(zoo, name, tmp_path):
    ids = token_ids()
    model = quantplug.load(zoo[name], dtype=torch.float32, progress=False)
    experts = _expert_modules(model)
    assert len(experts) == LAYERS * EXPERTS * 3
    assert set(experts.values()) == {"CompressedTensorsLinear"}, experts
    stacked = [n for n, _ in model.named_parameters() if n.endswith(("gate_up_proj", "experts.down_proj"))]
    assert not stacked  # no full-precision stacked experts left
    assert not [n for n, m in model.named_modules() if ".experts." in n and type(m) is torch.nn.Linear]
    assert _rel(logits(model, ids), reference_logits(zoo[name], ids, tmp_path)) < 1e-4


@pytest.mark.parametrize("name", ["qwen3_moe_w4a16", "qwen3_moe_fp8_weight", "mixtral_w4a16_w1w3w2"])
def test_saved_again_keeps_the_per_expert_names_and_loads_identical(zoo, name, tmp_path):
    """quantplug's save writes the tensors under the names it read (per expert, as vLLM reads
    them), with the same values, and the folder loads back to identical logits."""
    ids = token_ids()
    model = quantplug.load(zoo[name], progress=False)
    again = quantplug.save(model, tmp_path / "again")
    theirs, ours = _stored(zoo[name]), _stored(again)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    qc = json.loads((again / "config.json").read_text())["quantization_config"]
    assert (
        qc["config_groups"]
        == json.loads((zoo[name] / "config.json").read_text())["quantization_config"]["config_groups"]
    )
    assert torch.equal(logits(quantplug.load(again, progress=False), ids), logits(model, ids))


@pytest.mark.parametrize("suffix", ["weight_packed", "weight_scale"])
def test_an_expert_the_model_does_not_have_is_refused_by_name(zoo, suffix, tmp_path):
    """Expert 8 of 8: a per-expert tensor that finds no place is an error naming it (Transformers
    reports such a key as unexpected and loads on)."""
    folder = tmp_path / "extra"
    shutil.copytree(zoo["qwen3_moe_w4a16"], folder)
    state = _stored(folder)
    extra = f"model.layers.1.mlp.experts.8.gate_proj.{suffix}"
    state[extra] = state[f"model.layers.1.mlp.experts.7.gate_proj.{suffix}"].clone()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(extra)):
        quantplug.load(folder, progress=False)


def test_llmcompressor_mixtral_loads(zoo, tmp_path):
    """llm-compressor 0.14 stores Mixtral's experts as ``block_sparse_moe.experts.{e}.gate_proj``
    (not Transformers' ``w1``/``w3``/``w2``): the core names the unfused experts as the checkpoint
    does, and they load quantized with the library's logits."""
    ids = token_ids()
    model = quantplug.load(zoo["mixtral_w4a16"], dtype=torch.float32, progress=False)
    assert set(_expert_modules(model).values()) == {"CompressedTensorsLinear"}
    assert _rel(logits(model, ids), reference_logits(zoo["mixtral_w4a16_w1w3w2"], ids, tmp_path)) < 1e-4


_TRANSFORMERS = textwrap.dedent(
    """
    import sys, json
    from transformers import AutoModelForCausalLM
    report = {}
    for folder in sys.argv[1:]:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        experts = model.model.layers[0].mlp.experts
        report[folder] = {
            "experts": {n: str(p.dtype) for n, p in experts.named_parameters()},
            "missing": sorted(info["missing_keys"]),
            "unexpected": len(info["unexpected_keys"]),
        }
    print(json.dumps(report))
    """
)


def test_transformers_dequantizes_qwen3_experts_and_drops_llmcompressors_mixtral_experts(zoo):
    """What Transformers 5.25's own ``from_pretrained`` (a fresh process, no quantplug plugin) does
    with the same folders: Qwen3-MoE's experts become stacked bfloat16 parameters (dequantized; the
    attention stays quantized), and llm-compressor's Mixtral experts are left randomly initialised
    (the stacked parameters missing, every per-expert tensor unexpected) with only a load report.
    quantplug keeps them quantized (above, and test_llmcompressor_mixtral_loads)."""
    folders = [str(zoo["qwen3_moe_w4a16"]), str(zoo["mixtral_w4a16"])]
    run = subprocess.run(
        [sys.executable, "-c", _TRANSFORMERS, *folders], capture_output=True, text=True, env=ENV
    )
    assert run.returncode == 0, run.stderr[-3000:]
    qwen, mixtral = (json.loads(run.stdout.strip().splitlines()[-1])[f] for f in folders)
    dense = {"gate_up_proj": "torch.bfloat16", "down_proj": "torch.bfloat16"}
    assert qwen == {"experts": dense, "missing": [], "unexpected": 0}
    assert mixtral["experts"] == dense
    assert mixtral["missing"] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")
    ]
    assert mixtral["unexpected"] == LAYERS * EXPERTS * 3 * 3
