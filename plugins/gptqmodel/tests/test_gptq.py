"""quantplug-gptqmodel against the real GPTQModel: checkpoints GPTQModel writes re-save unchanged
(that they load with the writing library's logits is test_zoo.py's), what quantplug writes loads in
Transformers, GPTQ beats round-to-nearest at the same bits, and bad input is refused before anything
changes."""

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
from quantplug.testing import tiny_llama, token_ids

VOCAB = 384


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _calibration(n: int = 4, seed: int = 10):
    return [token_ids(VOCAB, (4, 32), seed=seed + i) for i in range(n)]


def _save_tokenizer(folder):
    """A word-level tokenizer over the tiny model's vocabulary (GPTQModel's loader wants one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t1", eos_token="t2")
    fast.save_pretrained(folder)


def _gptqmodel_checkpoint(root, name: str, **qcfg):
    """A tiny Llama quantized and saved by GPTQModel's own API (GPTQModel.load(...).quantize(...).save)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    fp, out = root / f"{name}-fp", root / name
    tiny_llama().save_pretrained(fp)
    _save_tokenizer(fp)
    model = GPTQModel.load(str(fp), QuantizeConfig(**qcfg), device="cpu")
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in _calibration(8)]
    # GPTQModel writes per-layer logs into ./logs of the working directory: keep them out of the repo
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        model.quantize(data, batch_size=4)
    model.save(str(out))
    return fp, out


def _transformers_logits(folder, ids, tmp_path, dtype="float32") -> torch.Tensor:
    """Logits of Transformers' own GPTQ integration (optimum + GPTQModel), in a fresh process."""
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        ids = load_file({str(tmp_path / "ids.safetensors")!r})["ids"]
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, device_map="cpu", dtype=torch.{dtype})
        layer = type(model.model.layers[0].self_attn.q_proj).__name__
        assert layer != "Linear", "Transformers did not load GPTQ layers"
        with torch.no_grad():
            save_file({{"logits": model(ids).logits.float().contiguous()}}, {str(tmp_path / "tf.safetensors")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(tmp_path / "tf.safetensors")["logits"]


def test_resave_of_a_gptqmodel_checkpoint_is_bit_identical(written_by_gptqmodel, tmp_path):
    for kind in ("v1-act-order-asym", "v2-asym"):
        _, folder = written_by_gptqmodel[kind]
        model = quantplug.load(folder, progress=False)
        out = quantplug.save(model, tmp_path / kind)
        saved = {}
        for f in out.glob("*.safetensors"):
            saved.update(load_file(f))
        original = load_file(folder / "model.safetensors")
        packed = [k for k in original if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
        assert packed
        for key in packed:
            assert torch.equal(saved[key], original[key]), key
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == qc["format"]


@pytest.mark.parametrize(
    "config", [{"bits": 4, "group_size": 32, "desc_act": True, "sym": False}, {"bits": 8}]
)
def test_transformers_loads_what_quantplug_writes(config, tmp_path):
    model = tiny_llama()
    quantplug.quantize(
        model, {"quant_method": "gptq", **config}, calibration_data=_calibration(), progress=False
    )
    ids = token_ids(VOCAB, (2, 12), seed=5)
    ours = _logits(model, ids)
    folder = quantplug.save(model, tmp_path / "ckpt")
    theirs = _transformers_logits(folder, ids, tmp_path)
    assert _rel(ours, theirs) < 0.02, _rel(ours, theirs)


def test_gptq_beats_round_to_nearest_at_the_same_bits():
    ids = token_ids(VOCAB, (4, 32), seed=77)  # held out: not in the calibration data
    full = _logits(tiny_llama(), ids)
    gptq = tiny_llama()
    quantplug.quantize(
        gptq,
        {"quant_method": "gptq", "bits": 4, "group_size": 32},
        calibration_data=_calibration(8),
        progress=False,
    )
    rtn = tiny_llama()
    quantplug.quantize(rtn, {"quant_method": "rtn", "bits": 4, "group_size": 32}, progress=False)
    err_gptq, err_rtn = _rel(_logits(gptq, ids), full), _rel(_logits(rtn, ids), full)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_transformers_gptqconfig_dict_is_accepted():
    from transformers import GPTQConfig

    data = GPTQConfig(bits=4, group_size=64, desc_act=True, sym=False).to_dict()
    config = quantplug.config_from_dict(data)
    assert (config.bits, config.group_size, config.desc_act, config.sym) == (4, 64, True, False)
    assert config.format == "gptq"


@pytest.mark.parametrize(
    "batches, says",
    [
        ([torch.zeros(1, 0, dtype=torch.long)], "empty"),
        ([torch.randn(2, 8)], "token ids"),
        ([torch.full((2, 8), VOCAB + 5)], "vocabulary"),
    ],
)
def test_bad_calibration_data_is_refused_before_any_weight_changes(batches, says):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(quantplug.ConfigError, match=says):
        quantplug.quantize(
            model, {"quant_method": "gptq", "bits": 4}, calibration_data=batches, progress=False
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_calibration_data_is_refused():
    with pytest.raises(quantplug.ConfigError, match="needs calibration data"):
        quantplug.quantize(tiny_llama(), {"quant_method": "gptq", "bits": 4}, progress=False)


def test_block_name_that_is_not_a_block_list_is_refused():
    with pytest.raises(quantplug.ConfigError, match="block_name_to_quantize"):
        quantplug.quantize(
            tiny_llama(),
            {"quant_method": "gptq", "bits": 4, "block_name_to_quantize": "model.norm"},
            calibration_data=_calibration(1),
            progress=False,
        )


def test_checkpoint_that_disagrees_with_its_config_names_the_tensor(written_by_gptqmodel, tmp_path):
    import shutil

    _, folder = written_by_gptqmodel["v1-sym"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64  # the tensors were packed with 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(quantplug.CheckpointError, match=r"qzeros|scales"):
        quantplug.load(bad, progress=False)

    bad2 = tmp_path / "bad2"
    shutil.copytree(folder, bad2)
    tensors = load_file(bad2 / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.g_idx"
    tensors[key] = tensors[key] + 100
    save_file(tensors, bad2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(quantplug.CheckpointError, match="down_proj.g_idx"):
        quantplug.load(bad2, progress=False)


def test_a_layer_whose_inputs_are_not_a_multiple_of_group_size_is_quantized_with_a_partial_group(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(576, 256))  # SmolLM2's hidden size, group 128: 4.5 groups
    x = torch.randn(64, 576)
    ref = model(x).detach()
    with pytest.warns(UserWarning, match="partial last group"):
        report = quantplug.quantize(
            model,
            {"quant_method": "gptq", "bits": 4},
            calibration_data=[torch.randn(128, 576)],
            progress=False,
        )
    assert report.converted == ["0"] and model[0].scales.shape[0] == 5
    out = model(x).detach()
    assert _rel(out, ref) < 0.15
    folder = quantplug.save(model, tmp_path / "partial")
    again = quantplug.load(folder, model=torch.nn.Sequential(torch.nn.Linear(576, 256)), progress=False)
    assert torch.equal(again(x), out)


def test_a_layer_the_packer_cannot_pack_is_left_in_full_precision_with_the_reason():
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 64))
    report = quantplug.quantize(
        model, {"quant_method": "gptq", "bits": 4, "group_size": 32}, calibration_data=[torch.randn(64, 64)],
        progress=False,
    )  # fmt: skip
    assert set(report.skipped) == {"0", "1"}
    assert "multiples of 32" in report.skipped["0"]


def test_cli_quantizes_with_gptq_calibrated_on_a_text_file(tmp_path):
    from click.testing import CliRunner

    from quantplug.cli import main

    folder = tmp_path / "fp"
    tiny_llama().save_pretrained(folder)
    _save_tokenizer(folder)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"t{(i * 7919) % VOCAB}" for i in range(600)))
    runner = CliRunner()
    refused = runner.invoke(
        main, ["quantize", str(folder), "-m", "gptq", "-b", "4", "-o", str(tmp_path / "x")]
    )
    assert refused.exit_code != 0 and "--calibration-text" in refused.output
    args = ["quantize", str(folder), "-m", "gptq", "-b", "4", "-s", "group_size=32", "--no-progress"]
    done = runner.invoke(main, [*args, "--calibration-text", str(text), "-o", str(tmp_path / "q")])
    assert done.exit_code == 0, done.output
    model = quantplug.load(tmp_path / "q", progress=False)
    assert type(model.model.layers[1].self_attn.o_proj).__name__ == "GptqLinear"
    ids = token_ids(VOCAB, (2, 12), seed=3)
    assert _rel(_logits(model, ids), _logits(tiny_llama(), ids)) < 0.3


def test_quantplugs_layers_leave_gptqmodels_kernel_selection_alone(written_by_gptqmodel, tmp_path):
    """Importing the plugin's layers must not add a kernel GPTQModel could select: Transformers' own
    GPTQ loading in the same process (after a quantplug quantize) keeps working."""
    import quantplug_gptqmodel.awq  # noqa: F401
    import quantplug_gptqmodel.layers  # noqa: F401
    from transformers import AutoModelForCausalLM

    _, folder = written_by_gptqmodel["v1-sym"]
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ not in ("GptqLinear", "Linear")
