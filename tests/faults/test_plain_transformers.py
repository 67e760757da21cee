"""Issue 18 item 2: a quantplug checkpoint never becomes a silently wrong model in plain Transformers.

Each test loads a checkpoint with ``AutoModelForCausalLM.from_pretrained`` in a fresh Python
process that has not imported quantplug: the start-up hook (``quantplug-hook.pth`` ->
``_quantplug_hook``) must make it load right (the bridge registered on demand) or fail with an
error that says what to do. Backends whose plugin is not installed in this env are skipped (the
integration env installs them all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantplug
from quantplug.testing import token_ids

from ._support import installed_methods, quantized_llama

# What plain from_pretrained must do with each first-party backend's checkpoint: every one loads
# right, bridged (rtn), in Transformers' own format (bitsandbytes, torchao), or routed to the bridge
# because Transformers knows the name but not quantplug's format (quanto, hqq: the guard reads the
# quantplug metadata in the safetensors header).
LOADS_RIGHT = {"rtn", "bitsandbytes", "torchao"}
ROUTED = {"quanto", "hqq"}

CHILD = """
import json, os, sys
import torch
from safetensors.torch import load_file

folder, expected_file = sys.argv[1], sys.argv[2]
expected = load_file(expected_file)
from transformers import AutoModelForCausalLM

out = {"quantplug_before": "quantplug" in sys.modules}
if len(sys.argv) > 3:  # the hook is off: register by hand first
    import quantplug
    quantplug.register_with_transformers()
try:
    model = AutoModelForCausalLM.from_pretrained(folder)
except Exception as exc:
    out["error"] = [type(exc).__name__, str(exc)]
else:
    with torch.no_grad():
        out["max_diff"] = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
    out["quantizer"] = type(getattr(model, "hf_quantizer", None)).__name__
    out["saved_method"] = model.config.to_dict().get("quantization_config", {}).get("quant_method")
    if os.environ.get("QPT_RESAVE"):  # save_pretrained, then plain from_pretrained of that
        model.save_pretrained(os.environ["QPT_RESAVE"])
        again = AutoModelForCausalLM.from_pretrained(os.environ["QPT_RESAVE"])
        with torch.no_grad():
            out["resaved_diff"] = (again(expected["ids"]).logits - expected["logits"]).abs().max().item()
print(json.dumps(out))
"""


def run_child(folder, expected_file, env_extra=None, register=False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTPLUG_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
    args = [sys.executable, "-c", textwrap.dedent(CHILD), str(folder), str(expected_file)]
    proc = subprocess.run(
        [*args, "register"] if register else args,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def saved(method: str, tmp_path):
    model = quantized_llama(method)
    ids = token_ids()
    with torch.no_grad():
        logits = model(ids).logits
    folder = tmp_path / method
    quantplug.save(model, folder)
    expected = tmp_path / f"{method}-expected.safetensors"
    save_file({"ids": ids, "logits": logits.contiguous()}, expected)
    return folder, expected


def require(method: str) -> None:
    if method not in installed_methods():
        pytest.skip(f"the {method} plugin is not installed in this env (the integration env runs it)")


@pytest.mark.parametrize("method", sorted(LOADS_RIGHT | ROUTED))
def test_plain_from_pretrained_in_a_fresh_process(method, tmp_path):
    require(method)
    resave = {"QPT_RESAVE": str(tmp_path / "resaved")} if method in ROUTED else {}
    out = run_child(*saved(method, tmp_path), resave)
    assert out["quantplug_before"] is False
    assert "error" not in out, out
    assert out["max_diff"] < 1e-4, out  # the model quantplug quantized, not a wrong one
    if method in ROUTED:  # through quantplug's bridge, not Transformers' own quantizer for the name
        assert out["quantizer"] == f"Routed{method.capitalize()}QuantplugHfQuantizer", out
        assert out["saved_method"] == method  # config.json keeps the method's own name
        # save_pretrained writes quantplug's header metadata: the re-saved folder is routed again
        assert out["resaved_diff"] < 1e-4, out
        reloaded = quantplug.load(tmp_path / "resaved")  # and quantplug.load reads what it wrote
        expected = load_file(tmp_path / f"{method}-expected.safetensors")
        with torch.no_grad():
            assert (reloaded(expected["ids"]).logits - expected["logits"]).abs().max().item() < 1e-4


def strip_quantplug_metadata(folder) -> None:
    """Rewrite ``folder``'s model.safetensors with Transformers' own header metadata only, as a
    checkpoint another tool wrote (Transformers 5.25 cannot quantize with HQQ itself)."""
    tensors = {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_without_quantplug_metadata_is_not_routed(tmp_path):
    """Without quantplug's header metadata the guard cannot tell quantplug wrote the folder: a config
    in the plugin's form is refused (Transformers cannot read it: for hqq it raises KeyError
    'quant_config'), with the pointer to quantplug.load, which loads it; quanto is refused too:
    neither Transformers nor quantplug wrote it."""
    for method in sorted(ROUTED):
        require(method)
        folder, expected = saved(method, tmp_path)
        strip_quantplug_metadata(folder)
        name, message = run_child(folder, expected)["error"]
        assert name == "CheckpointError", message
        if method == "hqq":
            assert "its safetensors header has no quantplug metadata" in message
            assert "load it with quantplug.load(path)" in message
            with torch.no_grad():
                logits = quantplug.load(folder)(load_file(expected)["ids"]).logits
            assert (logits - load_file(expected)["logits"]).abs().max().item() < 1e-4
        else:
            assert "written neither by Transformers" in message and "nor by quantplug" in message


def test_the_guard_decides_from_the_header(tmp_path):
    from quantplug.errors import CheckpointError
    from quantplug.integrations.guard import check_checkpoint_config, written_by_quantplug

    require("hqq")
    folder, _ = saved("hqq", tmp_path)
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert written_by_quantplug(folder, "hqq") is True
    assert written_by_quantplug(folder, "quanto") is False
    assert check_checkpoint_config(qconfig, folder) == "quantplug-hqq"
    # a Hub id (or anything but a readable local folder): who wrote it cannot be told, so it is refused
    for where in (None, "someone/hqq-model", str(tmp_path / "missing")):
        assert written_by_quantplug(where, "hqq") is None
        with pytest.raises(
            CheckpointError,
            match=r"not a local folder whose safetensors header says who wrote it\. If quantplug wrote it, load it with quantplug.load\(path\)",
        ):
            check_checkpoint_config(qconfig, where)
    strip_quantplug_metadata(folder)
    assert written_by_quantplug(folder, "hqq") is False
    with pytest.raises(CheckpointError, match="no quantplug metadata"):
        check_checkpoint_config(qconfig, folder)
    # Transformers' own form of an hqq config (its HqqConfig.to_dict()): Transformers' way, wherever it is
    from transformers import HqqConfig

    theirs = json.loads(json.dumps(HqqConfig(nbits=4, group_size=64).to_dict(), default=str))
    theirs["quant_method"] = "hqq"
    for where in (folder, None, "someone/hqq-model"):
        assert check_checkpoint_config(theirs, where) is None


def test_hook_off_then_register_with_transformers_by_hand(tmp_path):
    """With QUANTPLUG_TRANSFORMERS_HOOK=0, register_with_transformers() both bridges rtn and installs
    the guard (so a method Transformers would load wrong is still refused)."""
    require("rtn")
    folder, expected = saved("rtn", tmp_path)
    out = run_child(folder, expected, {"QUANTPLUG_TRANSFORMERS_HOOK": "0"}, register=True)
    assert "error" not in out, out
    assert out["max_diff"] < 1e-4

    quanto_dir = tmp_path / "fake-quanto"
    quanto_dir.mkdir()
    (quanto_dir / "config.json").write_text(
        json.dumps({**json.loads((folder / "config.json").read_text()), "quantization_config": QUANTO})
    )
    out = run_child(quanto_dir, expected, {"QUANTPLUG_TRANSFORMERS_HOOK": "0", **NO_QUANTO}, register=True)
    assert out["error"][0] == "CheckpointError", out


QUANTO = {"quant_method": "quanto", "weights": "int8", "activations": None, "modules_to_not_convert": None}
NO_QUANTO = {"QUANTPLUG_DISABLE_PLUGINS": "quanto"}


def test_quanto_checkpoint_without_its_plugin_is_refused(tmp_path):
    """Transformers cannot save quanto models, so a pre-quantized quanto folder is never its format:
    with the plugin absent (here: disabled) from_pretrained must not build random weights."""
    require("rtn")
    folder, expected = saved("rtn", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTO}))
    name, message = run_child(folder, expected, NO_QUANTO)["error"]
    assert name == "CheckpointError"
    assert "random values" in message and "quantplug.load(path)" in message
    if "quanto" in installed_methods():  # disabled, not missing: no pip advice
        assert "QUANTPLUG_DISABLE_PLUGINS" in message and "pip install" not in message
    else:  # not installed here (the core env): the command that installs it
        assert "provided by the plugin quantplug-quanto: pip install" in message


def test_a_quantplug_hqq_checkpoint_with_its_plugin_disabled_is_refused(tmp_path):
    require("hqq")
    folder, expected = saved("hqq", tmp_path)
    name, message = run_child(folder, expected, {"QUANTPLUG_DISABLE_PLUGINS": "hqq"})["error"]
    assert name == "CheckpointError"
    assert "written by quantplug's 'hqq' backend in its own format" in message
    assert "remove hqq from QUANTPLUG_DISABLE_PLUGINS" in message


def test_checkpoint_of_a_disabled_first_party_plugin_is_refused(tmp_path):
    require("rtn")
    folder, expected = saved("rtn", tmp_path)
    name, message = run_child(folder, expected, {"QUANTPLUG_DISABLE_PLUGINS": "rtn"})["error"]
    assert name == "UnknownMethodError"
    assert "quantized by quantplug's 'rtn' backend" in message
    assert "wrong model" in message
    assert "remove rtn from QUANTPLUG_DISABLE_PLUGINS" in message


def test_doctor_reports_the_hook(tmp_path):
    from quantplug.integrations.guard import hook_status

    ok, text = hook_status()
    assert ok and "on" in text  # this interpreter ran quantplug-hook.pth
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTPLUG_")}
    proc = subprocess.run(
        [sys.executable, "-c", "from quantplug.integrations.guard import hook_status; print(hook_status())"],
        env={**env, "QUANTPLUG_TRANSFORMERS_HOOK": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "(True, 'Transformers load hook: off (QUANTPLUG_TRANSFORMERS_HOOK=0)" in proc.stdout
    # python -S skips site-packages' .pth files: the packages stay importable through PYTHONPATH
    import sysconfig
    from pathlib import Path

    import _quantplug_hook

    paths = [str(Path(quantplug.__file__).parents[1]), str(Path(_quantplug_hook.__file__).parent)]
    paths.append(sysconfig.get_paths()["purelib"])
    proc = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "from quantplug.integrations.guard import hook_status; print(*hook_status())",
        ],
        env={**env, "PYTHONPATH": os.pathsep.join(paths)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.startswith("False Transformers load hook: not active"), proc.stderr[-2000:]
