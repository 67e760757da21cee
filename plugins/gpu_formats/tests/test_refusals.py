"""What is refused, and that each refusal says what the method needs and what to do.

- ``spqr`` / ``higgs`` checkpoints: ``quantplug.load`` refuses on the CPU before any tensor is read
  (the checks below truncate the weights file: had a tensor, or even the file's header, been read,
  the error would be a ``CheckpointError`` about the file), with a ``device_map`` too, and quantizing
  is refused before any layer changes.
- ``eetq`` checkpoints (Transformers' layout: int8 ``weight`` [in, out], fp16 ``weight_scales``):
  refused with the reason (the SM-specific layout), naming the layer.
- ``quantplug list`` shows the three backends with what they declare.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from quantplug_gpu_formats.cuda_only import refusal
from safetensors.torch import save_file

import quantplug
from quantplug.testing import tiny_llama

Q = "model.layers.0.self_attn.q_proj"  # a layer of tiny_llama: 128 x 128

CONFIGS = {
    "spqr": {
        "quant_method": "spqr",
        "bits": 3,
        "beta1": 16,
        "beta2": 16,
        "shapes": {
            f"{Q}.dense_weights.shape": 1024,
            f"{Q}.row_offsets.shape": 129,
            f"{Q}.col_vals.shape": 0,
            f"{Q}.in_perm.shape": 64,
        },
    },
    "higgs": {
        "quant_method": "higgs",
        "bits": 4,
        "p": 2,
        "group_size": 64,
        "hadamard_size": 128,
        "tune_metadata": {Q: {"M": 1, "N": 128, "K": 128, "num_sms": 132}},
    },
}
# what each message must name: the method, the requirement, the Transformers call, what to do
NAMES = {
    "spqr": ["SpQR ('spqr')", "CUDA GPU", "spqr_quant[gpu]", "nvcc", "create_placehodler"],
    "higgs": ["HIGGS ('higgs')", "CUDA GPU", "flute-kernel", "fast-hadamard-transform", "SM count"],
}
COMMON = ["from_pretrained(", "device_map='cuda'", "What to do:", "`quantplug select`"]


def _checkpoint(folder: Path, qconfig: dict, truncate: bool) -> Path:
    model = tiny_llama()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config))
    if truncate:  # nothing in it can be read: a read would fail with a CheckpointError naming the file
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:64])
    return folder


def _says_all(message: str, method: str) -> None:
    missing = [s for s in NAMES[method] + COMMON if s not in message]
    assert not missing, f"the refusal does not name {missing}: {message}"


@pytest.mark.parametrize("method", ["spqr", "higgs"])
def test_loading_on_the_cpu_is_refused_before_any_tensor_is_read(method, tmp_path):
    folder = _checkpoint(tmp_path / "ckpt", CONFIGS[method], truncate=True)
    with pytest.raises(quantplug.BackendUnavailableError) as err:
        quantplug.load(folder, progress=False)
    assert "on 'cpu'" in str(err.value) and "runs only on a CUDA GPU" in str(err.value)
    _says_all(str(err.value), method)


@pytest.mark.parametrize("method", ["spqr", "higgs"])
def test_loading_with_a_device_map_is_refused_too(method, tmp_path):
    pytest.importorskip("accelerate")
    folder = _checkpoint(tmp_path / "ckpt", CONFIGS[method], truncate=False)
    with pytest.raises(quantplug.BackendUnavailableError) as err:
        quantplug.load(folder, device_map={"": "cpu"}, progress=False)
    _says_all(str(err.value), method)


@pytest.mark.parametrize("method", ["spqr", "higgs"])
def test_quantizing_is_refused_before_any_layer_changes(method):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(quantplug.BackendUnavailableError) as err:
        quantplug.quantize(model, {"quant_method": method}, progress=False)
    _says_all(str(err.value), method)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.get_submodule(Q), torch.nn.Linear)


@pytest.mark.parametrize("method", ["spqr", "higgs"])
def test_on_cuda_too_the_refusal_points_to_transformers(method):
    quantizer = quantplug.AutoQuantizer.from_config({"quant_method": method})
    with pytest.raises(quantplug.BackendUnavailableError) as err:
        quantizer.validate_environment("cuda:0")
    assert "for CUDA either" in str(err.value)
    _says_all(str(err.value), method)
    meta = torch.nn.Linear(128, 128, device="meta")
    for call in (quantizer.empty_module, quantizer.expected_tensors):  # device_map and bridge paths
        with pytest.raises(quantplug.BackendUnavailableError) as err:
            call(Q, meta)
        assert str(err.value) == refusal(method, None)
    with pytest.raises(quantplug.BackendUnavailableError, match="on any device"):
        quantizer.load_module(Q, meta, {})


@pytest.mark.parametrize("method", ["spqr", "higgs"])
def test_transformers_own_path_keeps_from_pretrained(method, tmp_path):
    """quantplug's guard leaves these checkpoints to Transformers (transformers_format): on a CPU,
    Transformers' own quantizer refuses them, not quantplug."""
    from transformers import AutoModelForCausalLM

    folder = _checkpoint(tmp_path / "ckpt", CONFIGS[method], truncate=False)
    with pytest.raises((RuntimeError, NotImplementedError), match="GPU") as err:
        AutoModelForCausalLM.from_pretrained(folder)
    assert not isinstance(err.value, quantplug.QuantplugError)


def _eetq_checkpoint(folder: Path) -> Path:
    """A tiny checkpoint in Transformers' EETQ tensor names and shapes (the bytes are not EETQ's
    layout: nothing here can write that, which is the point)."""
    model = tiny_llama()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "eetq",
        "weights": "int8",
        "modules_to_not_convert": None,
    }
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, t in model.state_dict().items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and t.dim() == 2 and ("self_attn" in name or ".mlp." in name):
            tensors[name] = torch.zeros(t.shape[1], t.shape[0], dtype=torch.int8)
            tensors[f"{module}.weight_scales"] = torch.ones(t.shape[0], dtype=torch.float16)
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_an_eetq_checkpoint_is_refused_with_the_reason(tmp_path):
    folder = _eetq_checkpoint(tmp_path / "ckpt")
    with pytest.raises(quantplug.BackendUnavailableError) as err:
        quantplug.load(folder, progress=False)
    message = str(err.value)
    for part in ("EETQ", "model.layers.0.", "for the SM of the GPU", "kernels-community/quantization-eetq",
                 "from_pretrained(", "What to do:", "config={'quant_method': 'eetq'}"):  # fmt: skip
        assert part in message, (part, message)


def test_quantplug_list_shows_the_three_backends():
    cli = Path(sys.executable).with_name("quantplug")
    out = subprocess.run([str(cli), "list", "--json"], check=True, capture_output=True, text=True).stdout
    rows = {b["name"]: b for b in json.loads(out)["backends"]}
    assert {"spqr", "higgs", "eetq"} <= set(rows)
    for name in ("spqr", "higgs", "eetq"):
        assert rows[name]["plugin"] == "quantplug-gpu-formats", rows[name]
    text = subprocess.run([str(cli), "list"], check=True, capture_output=True, text=True).stdout
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for name in ("spqr", "higgs"):  # they run nowhere: not "load-only", and the note says why
        assert "devices=none (see its note)" in lines[name] and "load-only" not in lines[name]
        assert any(line.startswith(f"note: {name}: CUDA only") for line in text.splitlines())
    assert "devices=cpu,cuda" in lines["eetq"] and "serializable" not in lines["eetq"]
