"""The library side of test_zoo_moe.py, run in child processes (the tests import only its constants).
GPTQModel's loader patches Transformers for the whole process it runs in (Defuser's
``replace_fused_blocks``: after it, Transformers' ``save_pretrained`` even writes a Mixtral's experts
stacked), and auto-round registers its own MoE handling; so each tool runs in a process of its own,
apart from quantplug's loads and Transformers' own:

    python moe_zoo_library.py auto-round ROOT  tiny MoE checkpoints written by auto-round
    python moe_zoo_library.py gptqmodel ROOT   ... and by GPTQModel (from folders saved first)
    python moe_zoo_library.py reference ROOT   Transformers' loads, then GPTQModel's, of each one

The two writers make ROOT/<case> for every case of ``CASES``. ``reference`` writes
ROOT/reference.safetensors (logits of GPTQModel's own load with its torch kernels in float32,
``case``; of Transformers' load in float32 with the torch kernels, ``case/transformers``) and
ROOT/reference.json (what each load did).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

ARCHS = ("qwen3_moe", "mixtral")
#: case -> (architecture, writer, settings): GPTQ v1 and v2, symmetric and not, AWQ with and
#: without zero points. (GPTQModel 7.6 refuses to load any asymmetric v1 "gptq" checkpoint that
#: GPTAQ or FOEM did not write, auto-round's included, so auto-round's asymmetric run exports AWQ only.)
CASES = {
    "gptqmodel-gptq-qwen3_moe": ("qwen3_moe", "gptqmodel", {"sym": True, "format": "gptq"}),
    "gptqmodel-gptq_v2-mixtral": ("mixtral", "gptqmodel", {"sym": False, "format": "gptq_v2"}),
    "auto-round-auto_gptq-qwen3_moe": ("qwen3_moe", "auto-round", {"sym": True}),
    "auto-round-auto_awq-qwen3_moe": ("qwen3_moe", "auto-round", {"sym": True}),
    "auto-round-auto_awq-mixtral": ("mixtral", "auto-round", {"sym": False}),
}
VOCAB = 384
IDS_SEED = 99


def _model(arch: str):
    import torch

    from quantplug.testing_models import tiny_moe

    model = tiny_moe(arch)
    model.config.architectures = [type(model).__name__]  # as from_pretrained records them
    model.config.dtype = torch.float32
    return model


def _tokenizer(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_gptq import _save_tokenizer  # GPTQModel's loader wants a tokenizer in the folder

    _save_tokenizer(folder)


def _auto_round(root: Path, arch: str, sym: bool, formats: list[str]) -> None:
    """One auto-round run (iters=0: its zero-shot rounding; the exports are the same) exported to
    each of ``formats``."""
    from auto_round import AutoRound

    from quantplug.testing_models import token_ids

    tokenizer = types.SimpleNamespace(pad_token_id=None, pad_token=None)  # the dataset is token ids
    data = [token_ids(VOCAB, (1, 32), seed=10 + i) for i in range(4)]
    ar = AutoRound(
        _model(arch), tokenizer, bits=4, group_size=32, sym=sym, iters=0, nsamples=4, seqlen=32, dataset=data,
        device_map="cpu", enable_torch_compile=False,
    )  # fmt: skip
    out = root / f"auto-round-{arch}"
    ar.quantize_and_save(str(out), format=",".join(formats))
    for fmt in formats:
        # several formats: each into a folder named after it; one: into the settings' folder (w4g32)
        written = next(
            p.parent
            for p in out.rglob("config.json")
            if len(formats) == 1 or p.parent.name == fmt.replace("_", "-")
        )
        shutil.move(str(written), root / f"auto-round-{fmt}-{arch}")
        _tokenizer(root / f"auto-round-{fmt}-{arch}")


def _gptqmodel(root: Path, case: str, arch: str, settings: dict) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    from quantplug.testing_models import token_ids

    fp = root / f"fp-{arch}"
    model = GPTQModel.load(str(fp), QuantizeConfig(bits=4, group_size=32, **settings), device="cpu")
    data = [token_ids(VOCAB, (4, 32), seed=10 + i) for i in range(8)]
    model.quantize([{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in data], batch_size=4)
    model.save(str(root / case))


def write_auto_round(root: Path) -> None:
    runs: dict[tuple[str, bool], list[str]] = {}
    for case, (arch, writer, settings) in CASES.items():
        if writer == "auto-round":
            runs.setdefault((arch, settings["sym"]), []).append(case.split("-")[2])
    for (arch, sym), formats in runs.items():
        _auto_round(root, arch, sym, formats)


def write_gptqmodel(root: Path) -> None:
    for arch in ARCHS:  # saved before GPTQModel's loader runs: Transformers' per-expert layout
        _model(arch).save_pretrained(root / f"fp-{arch}")
        _tokenizer(root / f"fp-{arch}")
    for case, (arch, writer, settings) in CASES.items():
        if writer == "gptqmodel":
            _gptqmodel(root, case, arch, settings)


def _as_gptqmodel_names(folder: Path, out: Path) -> Path:
    """``folder`` with Mixtral's ``block_sparse_moe.`` keys renamed ``mlp.`` (the only layout
    GPTQModel 7.6 reads a Mixtral in); the tensors and the config are the same."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        save_file(
            {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()}, f, {"format": "pt"}
        )
    return out


def _transformers(folder: Path, ids):
    import torch
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    method = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
    kernel = GPTQConfig(bits=4, backend="torch") if method == "gptq" else AwqConfig(backend="torch_awq")
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, device_map="cpu", dtype=torch.float32, quantization_config=kernel, output_loading_info=True
    )
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    return logits, {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys")}


def _gptqmodel_load(folder: Path, ids):
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    # GPTQModel's loader accepts only float16 / bfloat16 for these kernels, which compute in the
    # input's dtype: float32, as quantplug-gptqmodel runs them here (a bfloat16 load would round the
    # float16 scales to bfloat16)
    for kernel in (TorchLinear, AwqTorchLinear):
        kernel.SUPPORTS_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
    method = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
    backend = BACKEND.TORCH if method == "gptq" else BACKEND.TORCH_AWQ
    model = GPTQModel.load(str(folder), backend=backend, device="cpu", dtype=torch.float32).model
    kinds = sorted({type(m).__name__ for n, m in model.named_modules() if ".experts." in n})
    with torch.no_grad():
        return model(ids).logits.float().contiguous(), kinds


def reference(root: Path) -> None:
    from safetensors.torch import save_file

    from quantplug.testing_models import token_ids

    ids = token_ids(VOCAB, (2, 12), seed=IDS_SEED)
    logits, report = {}, {}
    for case in CASES:  # Transformers first: GPTQModel's loader patches the classes it builds
        logits[f"{case}/transformers"], report[f"{case}/transformers"] = _transformers(root / case, ids)
    for case, (arch, writer, _) in CASES.items():
        folder = root / case
        if arch == "mixtral" and writer == "auto-round":
            folder = _as_gptqmodel_names(folder, root / "renamed" / case)
        logits[case], kinds = _gptqmodel_load(folder, ids)
        report[case] = {"expert_modules": kinds, "read": str(folder)}
    save_file(logits, root / "reference.safetensors")
    (root / "reference.json").write_text(json.dumps(report))


if __name__ == "__main__":
    {"auto-round": write_auto_round, "gptqmodel": write_gptqmodel, "reference": reference}[sys.argv[1]](
        Path(sys.argv[2])
    )
