"""The interop zoo for mixture-of-experts models (issue 29): GPTQ and AWQ checkpoints of tiny
Qwen3-MoE and Mixtral models (``quantplug.testing_models.tiny_moe``, 8 experts), written at test time
by GPTQModel 7.6 itself (it unfuses the experts with its Defuser, and writes per-expert
``...experts.{e}.gate_proj.qweight/qzeros/scales/g_idx``, the router ``mlp.gate`` left in full
precision) and by auto-round 0.16's ``auto_gptq`` / ``auto_awq`` exports, load through
``quantplug.load`` with every expert quantized and the writing library's logits, and save and load
back identical.

The reference is GPTQModel's own loader (``GPTQModel.load(..., backend=BACKEND.TORCH / TORCH_AWQ)``)
in float32, with the torch kernels quantplug-gptqmodel runs: Transformers cannot be the reference
here, it leaves the experts of every such checkpoint randomly initialised (its MoE converters look
for ``experts.*.gate_proj.weight``; the quantized per-expert tensors are "unexpected", the stacked
experts "missing"), which one test records. GPTQModel 7.6 reads a Mixtral only under its own names
(``mlp.experts.{e}.gate_proj``); auto-round writes ``block_sparse_moe.experts.{e}.gate_proj``, so
GPTQModel's reference for that one reads a copy with ``block_sparse_moe.`` renamed ``mlp.`` (same
tensors, same config). The tools run in child processes (moe_zoo_library.py says why)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from moe_zoo_library import CASES, IDS_SEED, VOCAB
from safetensors.torch import load_file, save_file
from test_gptq import _logits, _rel

import quantplug
from quantplug.testing_models import tiny_moe, token_ids

LIBRARY = Path(__file__).resolve().parent / "moe_zoo_library.py"
PER_EXPERT = re.compile(r"\.experts\.(\d+)\.[^.]+$")  # one expert's projection (its module name)


def _run(stage: str, root: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(LIBRARY), stage, str(root)], capture_output=True, text=True, env=env, timeout=900, cwd=root
    )  # fmt: skip
    assert proc.returncode == 0, f"{stage}:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The checkpoints (ROOT/<case>), and the libraries' logits and load reports for each."""
    root = tmp_path_factory.mktemp("zoo-moe")
    for stage in ("auto-round", "gptqmodel", "reference"):
        _run(stage, root)
    return types.SimpleNamespace(
        root=root,
        ids=token_ids(VOCAB, (2, 12), seed=IDS_SEED),
        reference=load_file(root / "reference.safetensors"),
        report=json.loads((root / "reference.json").read_text()),
    )


def _load(folder: Path) -> torch.nn.Module:
    return quantplug.load(folder, dtype=torch.float32, progress=False)


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_experts_quantized(model: torch.nn.Module, layer: str) -> None:
    """Every expert's projection is quantplug-gptqmodel's ``layer``; no expert weight is left in
    full precision, per expert or stacked."""
    from quantplug.experts import experts_sites

    cfg = model.config
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    per_expert = {n: type(m).__name__ for n, m in model.named_modules() if PER_EXPERT.search(n)}
    assert len(per_expert) == cfg.num_hidden_layers * experts * 3, sorted(per_expert)[:6]
    assert set(per_expert.values()) == {layer}, set(per_expert.values())
    dense = [n for n, m in model.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)]
    assert not dense and not experts_sites(model), dense[:4]
    stacked = [n for n, _ in model.named_parameters() if n.endswith(("gate_up_proj", "experts.down_proj"))]
    assert not stacked, stacked


@pytest.mark.parametrize("case", list(CASES))
def test_what_the_tool_wrote_loads_with_its_experts_quantized_and_its_logits(zoo, case, tmp_path):
    arch, _, _ = CASES[case]
    folder = zoo.root / case
    written = _stored(folder)
    # what the tool wrote: each expert's projections quantized, one by one; the router as it was
    assert any(re.search(r"\.experts\.7\.\w+\.qweight$", k) for k in written), sorted(written)[:8]
    routers = [k for k in written if k.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))]
    assert len(routers) == 2 and all(written[k].is_floating_point() for k in routers), routers

    model = _load(folder)
    _assert_experts_quantized(model, "AwqLinear" if "awq" in case else "GptqLinear")
    ours = _logits(model, zoo.ids)
    assert _rel(ours, zoo.reference[case]) < 1e-3, _rel(ours, zoo.reference[case])  # same kernels, float32
    assert _rel(ours, _logits(tiny_moe(arch), zoo.ids)) < 0.3  # the quantized model, not random experts

    out = quantplug.save(model, tmp_path / "again")
    # the tool's quantization_config is written back (auto-round's dynamic exclusions of the routers too)
    original = json.loads((folder / "config.json").read_text())["quantization_config"]
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: saved.get(k) for k in original if k != "meta"} == {
        k: v for k, v in original.items() if k != "meta"
    }
    again = _load(out)
    _assert_experts_quantized(again, "AwqLinear" if "awq" in case else "GptqLinear")
    assert torch.equal(_logits(again, zoo.ids), ours)
    # the packed tensors are written back unchanged (a Mixtral under Transformers' block_sparse_moe
    # prefix, which GPTQModel writes as mlp)
    saved = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in _stored(tmp_path / "again").items()}
    packed = [k for k in written if re.search(r"\.experts\.\d+\.\w+\.(qweight|qzeros|scales|g_idx)$", k)]
    for key in packed:
        assert torch.equal(saved[key.replace(".block_sparse_moe.", ".mlp.")], written[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_leaves_the_experts_random_where_quantplug_loads_them(zoo, case):
    """What Transformers 5.25's own ``from_pretrained`` (its GPTQ / AWQ integration) does with
    these checkpoints: the stacked experts are "missing" (randomly initialised) and every per-expert
    quantized tensor "unexpected", with only its load report to say so. quantplug's logits are the
    library's (the test above); Transformers' are not."""
    report = zoo.report[f"{case}/transformers"]
    missing = {k.rpartition(".")[2] for k in report["missing_keys"]}
    assert missing == {"gate_up_proj", "down_proj"}, report["missing_keys"]
    assert all(".experts." in k for k in report["missing_keys"])
    dropped = [k for k in report["unexpected_keys"] if PER_EXPERT.search(k.rpartition(".")[0])]
    assert len(dropped) == len(report["unexpected_keys"]) > 0, report["unexpected_keys"][:6]
    theirs = zoo.reference[f"{case}/transformers"]
    assert _rel(theirs, zoo.reference[case]) > 0.05, "Transformers now loads MoE experts: update this test"


@pytest.mark.parametrize("case", ["gptqmodel-gptq-qwen3_moe", "auto-round-auto_awq-mixtral"])
def test_an_expert_the_model_does_not_have_is_refused_by_name(zoo, case, tmp_path):
    """One more expert (index 8 of 8: a copy of expert 0's tensors) is refused, naming it, never
    dropped as Transformers drops what finds no place."""
    folder = Path(shutil.copytree(zoo.root / case, tmp_path / case))
    (path,) = folder.glob("*.safetensors")
    tensors = load_file(path)
    extra = {
        k.replace(".experts.0.", ".experts.8."): v.clone()
        for k, v in tensors.items()
        if ".layers.1." in k and ".experts.0." in k
    }
    save_file({**tensors, **extra}, path, {"format": "pt"})
    with pytest.raises(
        quantplug.CheckpointError,
        match=r"unexpected tensors .*layers\.1\.(mlp|block_sparse_moe)\.experts\.8\.",
    ):
        _load(folder)


def test_dynamic_is_accepted_when_it_only_excludes_layers():
    """auto-round's auto_gptq export of an MoE model excludes the routers with GPTQModel's
    ``dynamic`` ('-:<regex>': not quantized); such a config loads (the checkpoints above), and a
    model quantized with it leaves the layers it names in full precision. Per-layer overrides
    ('+:' or bare keys with settings) stay refused."""
    from quantplug.testing import tiny_llama

    exclude = {"-:.*layers\\.1\\.mlp\\.down_proj": {}}
    model = tiny_llama()
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dynamic": exclude}
    calibration = [token_ids(VOCAB, (2, 32), seed=3)]
    report = quantplug.quantize(model, config, calibration_data=calibration, progress=False)
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear, report
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "GptqLinear"
    for dynamic in ({"+:.*down_proj": {"bits": 8}}, {".*down_proj": {"bits": 8}}):
        with pytest.raises(quantplug.ConfigError, match="dynamic"):
            quantplug.quantize(tiny_llama(), {**config, "dynamic": dynamic}, calibration_data=calibration)
