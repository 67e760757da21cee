"""The interop zoo (GPTQ / AWQ side): checkpoints the field's own tools write, made here at test time
from tiny random Llamas, load through ``quantplug.load`` with the writing library's logits.

Writers: GPTQModel's own save (v1 and v2 layouts, with and without act-order, symmetric and not,
8 bits: the session fixture ``written_by_gptqmodel``), auto-round 0.16's exports to ``auto_gptq``
and ``auto_awq`` (symmetric and not), and each of these loaded and saved again by Transformers
(``from_pretrained`` with its defaults, then ``save_pretrained``, as a user does). The reference
is Transformers' own loading of the same folder (GPTQModel's kernels, what auto-round's exports are
read with too) with GPTQModel's torch kernels in float32, the kernel quantplug-gptqmodel runs: the
logits agree to float rounding. (Transformers' default CPU kernels compute in bfloat16: within 2 %,
as test_awq.py checks.) All references come from one child process.

Transformers' re-save of a v1 ("gptq") checkpoint loaded on the CPU writes the v2 zero points under
the v1 label, and Transformers reloads it wrong: a symmetric one is refused here with the fix, an
asymmetric one (indistinguishable) loads with the library's logits."""

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
from test_gptq import VOCAB, _logits, _rel

import quantplug
from quantplug.testing import tiny_llama, token_ids

#: auto-round runs: (name, settings); each is exported to both formats
AUTO_ROUND = {"sym": {"sym": True}, "asym": {"sym": False}}
AUTO_ROUND_FORMATS = {"auto_gptq": "gptq", "auto_awq": "awq"}
GPTQMODEL = (
    "v1-sym", "v1-asym", "v1-act-order-sym", "v1-act-order-asym",
    "v2-sym", "v2-asym", "v2-act-order-sym", "v2-act-order-asym", "v1-8bit",
)  # fmt: skip
CASES = [f"gptqmodel-{k}" for k in GPTQMODEL] + [
    f"auto-round-{fmt}-{k}" for k in AUTO_ROUND for fmt in AUTO_ROUND_FORMATS
]

_REFERENCE = """
import json, sys, traceback
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

jobs = json.loads(sys.argv[1])
ids = load_file(sys.argv[2])["ids"]
logits, errors = {}, {}
for name, folder, resaved in jobs:
    try:  # what a user does: load with Transformers' defaults, save again
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        model.save_pretrained(resaved)
    except Exception:
        errors[name + "/resaved"] = traceback.format_exc()[-2000:]
    for key, path in ((name, folder), (name + "/resaved", resaved)):
        if key in errors:
            continue
        method = json.load(open(path + "/config.json"))["quantization_config"]["quant_method"]
        torch_kernel = GPTQConfig(bits=4, backend="torch") if method == "gptq" else AwqConfig(backend="torch_awq")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, device_map="cpu", dtype=torch.float32, quantization_config=torch_kernel
            )
            assert type(model.model.layers[0].mlp.down_proj).__name__ in ("TorchLinear", "AwqTorchLinear")
            with torch.no_grad():
                logits[key] = model(ids).logits.float().contiguous()
        except Exception:
            errors[key] = traceback.format_exc()[-2000:]
save_file(logits, sys.argv[3])
json.dump(errors, open(sys.argv[4], "w"))
"""


def _auto_round_exports(root: Path, name: str, **settings) -> dict[str, Path]:
    """A tiny Llama quantized by auto-round itself and exported to ``auto_gptq`` and ``auto_awq``."""
    from auto_round import AutoRound

    model = tiny_llama()
    model.config.architectures = ["LlamaForCausalLM"]  # as from_pretrained sets them
    model.config.dtype = torch.float32
    tokenizer = types.SimpleNamespace(pad_token_id=None, pad_token=None)  # the dataset is token ids
    data = [token_ids(VOCAB, (1, 32), seed=10 + i) for i in range(4)]
    ar = AutoRound(
        model, tokenizer, bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, dataset=data,
        device_map="cpu", enable_torch_compile=False, **settings,
    )  # fmt: skip
    folder = root / f"auto-round-{name}"
    ar.quantize_and_save(str(folder), format=",".join(AUTO_ROUND_FORMATS))  # one run, both exports
    out = {
        fmt: next(folder.rglob(f"{fmt.replace('_', '-')}/config.json")).parent for fmt in AUTO_ROUND_FORMATS
    }
    return out


@pytest.fixture(scope="module")
def zoo(written_by_gptqmodel, tmp_path_factory):
    """{case: (written folder, Transformers' re-save of it)}, and the reference logits and errors."""
    root = tmp_path_factory.mktemp("zoo")
    folders = {f"gptqmodel-{k}": written_by_gptqmodel[k][1] for k in GPTQMODEL}
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)  # auto-round and GPTQModel write logs into the working directory
        for name, settings in AUTO_ROUND.items():
            for fmt, folder in _auto_round_exports(root, name, **settings).items():
                folders[f"auto-round-{fmt}-{name}"] = folder
    jobs = [(case, str(folders[case]), str(root / "resaved" / case)) for case in CASES]
    ids = token_ids(VOCAB, (2, 12), seed=99)
    save_file({"ids": ids}, root / "ids.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [json.dumps(jobs), root / "ids.safetensors", root / "ref.safetensors", root / "errors.json"]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_REFERENCE), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=600, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    qcs = {c: json.loads((folders[c] / "config.json").read_text())["quantization_config"] for c in CASES}
    return types.SimpleNamespace(
        folders={case: (folders[case], root / "resaved" / case) for case in CASES},
        # GPTQ's layout (v1 "gptq" when not said, as auto-round's export leaves it), or "awq"
        written_format={
            c: qc.get("checkpoint_format")
            or qc.get("format")
            or ("gptq" if qc["quant_method"] == "gptq" else "awq")
            for c, qc in qcs.items()
        },
        ids=ids,
        reference=load_file(root / "ref.safetensors"),
        errors=json.loads((root / "errors.json").read_text()),
    )


#: symmetric v1 checkpoints, whose Transformers re-save quantplug refuses (see below)
V1_SYM = {"gptqmodel-v1-sym", "gptqmodel-v1-act-order-sym", "gptqmodel-v1-8bit", "auto-round-auto_gptq-sym"}


def _load(folder: Path) -> torch.nn.Module:
    return quantplug.load(folder, dtype=torch.float32, progress=False)


@pytest.mark.parametrize("case", CASES)
def test_what_the_tool_wrote_loads_with_its_logits(zoo, case):
    assert case not in zoo.errors, f"the library itself could not load it:\n{zoo.errors[case]}"
    model = _load(zoo.folders[case][0])
    layer = type(model.model.layers[0].mlp.down_proj).__name__
    assert layer == ("AwqLinear" if "awq" in case else "GptqLinear"), layer
    ours = _logits(model, zoo.ids)
    assert _rel(ours, zoo.reference[case]) < 1e-3, _rel(ours, zoo.reference[case])  # same kernel, float32
    assert _rel(ours, _logits(tiny_llama(), zoo.ids)) < 0.3  # the quantized model, not random weights


@pytest.mark.parametrize("case", [c for c in CASES if c not in V1_SYM])
def test_transformers_resave_loads_with_transformers_logits(zoo, case):
    """v2 and AWQ re-saves keep the model. A v1 one does not (Transformers writes the v2 zero points
    GPTQModel's CPU kernels converted them to, under the v1 label, and reloads it wrong): for an
    asymmetric one that cannot be told from the tensors, and quantplug gives the library's logits."""
    key = f"{case}/resaved"
    assert key not in zoo.errors, f"the library itself could not load it:\n{zoo.errors[key]}"
    ours = _logits(_load(zoo.folders[case][1]), zoo.ids)
    assert _rel(ours, zoo.reference[key]) < 1e-3, _rel(ours, zoo.reference[key])
    kept = _rel(zoo.reference[key], zoo.reference[case]) < 1e-3
    assert kept == (zoo.written_format[case] != "gptq"), "Transformers' re-save changed, update this test"


@pytest.mark.parametrize("case", sorted(V1_SYM))
def test_transformers_resave_of_a_symmetric_v1_checkpoint_is_refused_with_the_fix(zoo, case, tmp_path):
    import shutil

    resaved = zoo.folders[case][1]
    assert _rel(zoo.reference[f"{case}/resaved"], zoo.reference[case]) > 1e-2  # Transformers reloads it wrong
    with pytest.raises(
        quantplug.CheckpointError, match=r"qzeros: every zero point is \d+, as GPTQModel's v2"
    ):
        _load(resaved)
    # the fix the message gives loads the model that was written
    fixed = Path(shutil.copytree(resaved, tmp_path / "fixed"))
    data = json.loads((fixed / "config.json").read_text())
    data["quantization_config"].update(format="gptq_v2", checkpoint_format="gptq_v2")
    (fixed / "config.json").write_text(json.dumps(data))
    ours = _logits(_load(fixed), zoo.ids)
    assert _rel(ours, zoo.reference[case]) < 1e-3, _rel(ours, zoo.reference[case])


@pytest.mark.parametrize("fmt", list(AUTO_ROUND_FORMATS))
def test_auto_rounds_keys_are_kept_and_written_back_with_the_tensors_unchanged(zoo, fmt, tmp_path):
    written, _ = zoo.folders[f"auto-round-{fmt}-asym"]
    original = json.loads((written / "config.json").read_text())["quantization_config"]
    assert {"autoround_version", "provider", "iters", "data_type"} <= set(original)
    out = quantplug.save(quantplug.load(written, progress=False), tmp_path / "again")
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: saved[k] for k in original} == original
    before, after = load_file(written / "model.safetensors"), load_file(out / "model.safetensors")
    packed = [k for k in before if k.endswith((".qweight", ".qzeros", ".scales"))]
    assert packed and all(torch.equal(before[k], after[k]) for k in packed)


def test_a_gptq_config_from_auto_round_that_is_not_integer_is_refused(zoo, tmp_path):
    import shutil

    written, _ = zoo.folders["auto-round-auto_gptq-sym"]
    folder = Path(shutil.copytree(written, tmp_path / "fp"))
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"]["data_type"] = "nv_fp"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(quantplug.ConfigError, match="data_type='nv_fp'.*integer"):
        quantplug.load(folder, progress=False)
