"""Checkpoints both ways with auto-round itself: folders written by auto-round's own
``quantize_and_save(format="auto_round")`` load through ``quantplug.load`` with the logits of the
library's own load (Transformers with auto-round installed), and what quantplug writes loads in
Transformers (a fresh process) with quantplug's logits. Tiny random Llamas, built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import quantplug
from quantplug.testing import tiny_llama, token_ids

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _calibration(n: int = 4, seq: int = 32) -> list[torch.Tensor]:
    return [token_ids(shape=(1, seq), seed=10 + i) for i in range(n)]


def _library_folder(out: Path, **settings) -> Path:
    """A tiny Llama quantized and saved by auto-round itself (its own API, no quantplug)."""
    from auto_round import AutoRound

    model = tiny_llama()
    # as from_pretrained sets them (without dtype in config.json, quantplug.load builds the model in
    # the stored tensors' bf16 while Transformers builds float32)
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.dtype = torch.float32
    tokenizer = types.SimpleNamespace(pad_token_id=None, pad_token=None)  # the dataset is token ids
    ar = AutoRound(
        model,
        tokenizer,
        iters=2,
        nsamples=4,
        seqlen=32,
        dataset=_calibration(),
        device_map="cpu",
        enable_torch_compile=False,
        **settings,
    )
    ar.quantize_and_save(str(out), format="auto_round")
    return next(p.parent for p in out.rglob("config.json"))


def _backend_of(model) -> str:
    """The auto-round backend quantplug-autoround ran ``model``'s layers with: "torch" by default,
    auto-round-lib's kernel ("auto", what Transformers picks) where auto-round has no torch backend."""
    layer = type(model.model.layers[0].self_attn.q_proj)
    return "auto" if any(c.__module__.startswith("auto_round_kernel") for c in layer.__mro__) else "torch"


def _transformers_logits(
    folder: Path, ids: torch.Tensor, tmp: Path, backend: str = "torch", resave: bool = False
) -> Any:
    """Logits of Transformers' own from_pretrained (auto-round's integration) in float32, in a fresh
    process, with the auto-round backend quantplug-autoround used (``_backend_of``: its torch backend
    by default; auto-round-lib's kernel, Transformers' default when installed, is opt-in in quantplug).

    With ``resave``: a dict that also holds the logits of Transformers' re-saves (``save_pretrained``
    into ``tmp / "resaved-<how>"``, reloaded the same way): "backend" from the model loaded above,
    "default" from one loaded with Transformers' defaults, as a user does; the error Transformers
    raises reloading one instead of its logits."""
    from safetensors.torch import load_file, save_file

    save_file({"ids": ids}, tmp / "ids.safetensors")
    script = textwrap.dedent(
        f"""
        import torch, traceback
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, AutoRoundConfig
        ids = load_file({str(tmp / "ids.safetensors")!r})["ids"]
        def load(path, **kwargs):
            return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kwargs)
        def logits(model):
            layer = type(model.model.layers[0].self_attn.q_proj)
            assert "QuantLinear" in layer.__name__ or layer.__name__ == "AwqTorchLinear", layer
            with torch.no_grad():
                return model(ids).logits.float().contiguous()
        backend = dict(quantization_config=AutoRoundConfig(backend={backend!r}))
        model = load({str(folder)!r}, **backend)
        out = {{"logits": logits(model)}}
        if {resave!r}:
            model.save_pretrained({str(tmp / "resaved-backend")!r})
            load({str(folder)!r}).save_pretrained({str(tmp / "resaved-default")!r})
            for how in ("backend", "default"):
                path = {str(tmp)!r} + "/resaved-" + how
                try:
                    out[how] = logits(load(path, **backend))
                except Exception:
                    open(path + "/error.txt", "w").write(traceback.format_exc())
        save_file(out, {str(tmp / "tf.safetensors")!r})
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = load_file(tmp / "tf.safetensors")
    if not resave:
        return out["logits"]
    for how in ("backend", "default"):
        if how not in out:
            out[how] = (tmp / f"resaved-{how}" / "error.txt").read_text()
    return out


@pytest.fixture(scope="module")
def library_folder(tmp_path_factory) -> Path:
    return _library_folder(tmp_path_factory.mktemp("autoround"), bits=4, group_size=32, sym=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 4, "group_size": 32, "sym": True},
        {"bits": 4, "group_size": 64, "sym": False},
        {"bits": 8, "group_size": 128, "sym": True},
        {"bits": 2, "group_size": 32, "sym": False},
        # the head quantized too: auto-round lists it in extra_config, outside its blocks
        {
            "bits": 4,
            "group_size": 32,
            "sym": True,
            "layer_config": {"lm_head": {"bits": 4, "group_size": 32}},
        },
    ],
    ids=["int4-sym", "int4-asym-awq", "int8-sym", "int2-asym", "int4-head-quantized"],
)
def test_load_folder_written_by_auto_round(settings, tmp_path):
    folder = _library_folder(tmp_path / "ar", **settings)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["packing_format"].startswith("auto_round")
    ids = token_ids(shape=(2, 16))
    model = quantplug.load(folder, dtype=torch.float32, progress=False)
    name = type(model.model.layers[0].mlp.down_proj).__name__
    assert "QuantLinear" in name or name == "AwqTorchLinear", name
    assert (type(model.lm_head) is torch.nn.Linear) == ("layer_config" not in settings)
    with torch.no_grad():
        ours = model(ids).logits.float()
    theirs = _transformers_logits(folder, ids, tmp_path, _backend_of(model), resave=True)
    # the same backend on the same tensors, both in float32
    assert _rel(ours, theirs["logits"]) < 1e-2, _rel(ours, theirs["logits"])
    # Transformers' re-saves: each loads with the logits Transformers reloads it with, or, where
    # Transformers cannot reload its own re-save (auto-round-lib's CPU kernel repacks the weights on
    # load, and save_pretrained writes them repacked under the same packing_format), it is refused
    # naming the tensor whose shape is not the format's, and why
    for how in ("backend", "default"):
        again, resave = theirs[how], tmp_path / f"resaved-{how}"
        if isinstance(again, str):
            assert "size mismatch" in again or "mismatched_sizes" in again, again[-2000:]
            with pytest.raises(
                quantplug.CheckpointError,
                match=r"qweight' has shape \[\d+\], expected \[\d+, \d+\]: a flat qweight .* auto-round-lib's CPU kernel's repacked",
            ):
                quantplug.load(resave, progress=False)
            continue
        with torch.no_grad():
            ours_again = quantplug.load(resave, dtype=torch.float32, progress=False)(ids).logits.float()
        assert _rel(ours_again, again) < 1e-2, (how, _rel(ours_again, again))
        assert _rel(again, theirs["logits"]) < 1e-3  # and that re-save kept the model


@pytest.mark.parametrize(
    ("settings", "packing"),
    [
        ({"bits": 4, "group_size": 64}, "auto_round:auto_gptq"),
        ({"bits": 4, "group_size": 64, "modules_to_not_convert": []}, "auto_round:auto_gptq"),
        ({"bits": 4, "group_size": 32, "sym": False}, "auto_round:auto_awq"),
    ],
)
def test_quantplug_checkpoint_loads_in_transformers(settings, packing, tmp_path):
    model = tiny_llama()
    quantplug.quantize(
        model,
        {"quant_method": "auto-round", "iters": 2, **settings},
        calibration_data=_calibration(2, 16),
        progress=False,
    )
    ids = token_ids(shape=(2, 16))
    with torch.no_grad():
        ours = model(ids).logits
    folder = quantplug.save(model, tmp_path / "ckpt")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == packing
    assert None not in qc.values()  # auto-round's loader reads a present key as set
    if settings.get("modules_to_not_convert") == []:  # the head is quantized: recorded as auto-round does
        assert qc["extra_config"]["lm_head"]["bits"] == 4 and qc["block_name_to_quantize"] == "model.layers"
        assert type(quantplug.load(folder, progress=False).lm_head).__name__.startswith("QuantLinear")
    # auto-round's torch backends in both (Transformers may pick another torch implementation of the
    # same packing): equal within float rounding
    torch.testing.assert_close(
        _transformers_logits(folder, ids, tmp_path, _backend_of(model)), ours.float(), rtol=1e-3, atol=1e-3
    )


def test_config_parses_what_auto_round_and_transformers_write(library_folder):
    from quantplug_autoround import AutoRoundConfig

    written = json.loads((library_folder / "config.json").read_text())["quantization_config"]
    config = quantplug.config_from_dict(written)
    assert isinstance(config, AutoRoundConfig) and config.autoround_version == written["autoround_version"]
    assert AutoRoundConfig.from_dict(config.to_dict()) == config
    # Transformers' AutoRoundConfig(...).to_dict() keys
    from transformers import AutoRoundConfig as HfAutoRoundConfig

    hf = HfAutoRoundConfig(bits=4, group_size=128, sym=True).to_dict()
    parsed = quantplug.config_from_dict(hf)
    assert parsed.packing_format == hf["packing_format"] and parsed.packing == "auto_round:auto_gptq"
    assert AutoRoundConfig.from_dict(parsed.to_dict()) == parsed


def test_qweight_shape_that_disagrees_with_the_config_is_refused(library_folder, tmp_path):
    folder = Path(shutil.copytree(library_folder, tmp_path / "bad"))
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"]["bits"] = 8  # the stored qweight holds 4-bit codes
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(quantplug.CheckpointError, match=r"qweight.*shape"):
        quantplug.load(folder, progress=False)


def test_a_key_auto_round_adds_later_is_kept_and_written_back(library_folder, tmp_path):
    """Keys AutoRoundConfig does not know (a newer auto-round's) load, as the library loads them, and
    a re-save writes them back; a user's config with one stays strict."""
    from quantplug_autoround import AutoRoundConfig

    folder = Path(shutil.copytree(library_folder, tmp_path / "newer"))
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"]["future_setting"] = {"mode": "x"}
    (folder / "config.json").write_text(json.dumps(data))
    ids = token_ids(shape=(1, 8))
    model = quantplug.load(folder, progress=False)
    with torch.no_grad():
        expected = quantplug.load(library_folder, progress=False)(ids).logits
        assert torch.equal(model(ids).logits, expected)
    saved = quantplug.save(model, tmp_path / "again")
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["future_setting"] == {
        "mode": "x"
    }
    config = AutoRoundConfig.from_checkpoint(data["quantization_config"])
    plain = AutoRoundConfig.from_dict(
        {k: v for k, v in data["quantization_config"].items() if k != "future_setting"}
    )
    assert config == plain and hash(config) == hash(plain)
    with pytest.raises(quantplug.ConfigError, match="future_setting"):
        AutoRoundConfig.from_dict(data["quantization_config"])
