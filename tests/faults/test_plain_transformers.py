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
from safetensors.torch import save_file

import quantplug
from quantplug.testing import token_ids

from ._support import installed_methods, quantized_llama

# What plain from_pretrained must do with each first-party backend's checkpoint.
LOADS_RIGHT = {"rtn", "bitsandbytes", "torchao"}  # bridged (rtn) or Transformers' own format
REFUSED = {"quanto", "hqq"}  # Transformers knows the name but not quantplug's format

CHILD = """
import json, sys
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


@pytest.mark.parametrize("method", sorted(LOADS_RIGHT | REFUSED))
def test_plain_from_pretrained_in_a_fresh_process(method, tmp_path):
    require(method)
    out = run_child(*saved(method, tmp_path))
    assert out["quantplug_before"] is False
    if method in LOADS_RIGHT:
        assert "error" not in out, out
        assert out["max_diff"] < 1e-4, out  # the model quantplug quantized, not a wrong one
    else:
        name, message = out["error"]
        assert name == "CheckpointError", out
        assert f"written by quantplug's {method!r} backend" in message
        assert "quantplug.load(path)" in message


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
