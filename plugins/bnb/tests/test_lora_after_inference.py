"""QLoRA after an inference pass (issue 28, part 3): a user evaluates the quantized model first
(an eval-mode forward under ``torch.no_grad()``), then attaches LoRA adapters and trains.

On CPUs with AVX512-BF16 bitsandbytes repacks each 4-bit layer for its CPU kernel on that first
forward and afterwards always runs that kernel, which has no backward: without the plugin's
unpacking, every LoRA gradient is None and the loss stays flat. Elsewhere nothing is repacked and
these tests hold trivially; ``test_the_first_forward_repacks_where_bitsandbytes_says`` shows which
case this machine is."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from peft import LoraConfig, get_peft_model

import quantplug
from quantplug.testing import tiny_llama, token_ids

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
CASES = {
    "nf4": NF4,
    "nf4-dq": {**NF4, "bnb_4bit_use_double_quant": True},
    "fp4": {**NF4, "bnb_4bit_quant_type": "fp4"},
    "int8": {"quant_method": "bitsandbytes", "load_in_8bit": True},
}
IDS = token_ids()


def _model(cfg, evaluate_first, under=torch.no_grad):
    model = tiny_llama()
    quantplug.quantize(model, cfg, progress=False)
    if evaluate_first:
        with under():
            model.eval()(IDS)
    return model


def _repacked(model):
    states = [getattr(m.weight, "quant_state", None) for m in model.modules() if hasattr(m, "weight")]
    return [bool(getattr(s, "packing_format_for_cpu", False)) for s in states if s is not None]


def _train(model, steps=8, train_mode=True):
    """get_peft_model (without prepare_model_for_kbit_training, as many users do) and ``steps``
    AdamW steps; every adapter weight must get a gradient at every step and change. The losses."""
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    initial = {n: p.detach().clone() for n, p in adapters.items()}
    opt = torch.optim.AdamW(adapters.values(), lr=5e-3)
    model.train(train_mode)
    torch.manual_seed(0)
    losses = []
    for step in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        missing = [n for n, p in adapters.items() if p.grad is None]
        assert not missing, f"step {step}: no gradient for {missing}"
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(not torch.equal(initial[n], p) for n, p in adapters.items())  # (lora_A from step 2)
    return model, losses


def test_the_first_forward_repacks_where_bitsandbytes_says():
    # what the other tests exercise on this machine: repacked layers on AVX512-BF16 CPUs, none elsewhere
    model = _model(CASES["nf4"], evaluate_first=True)
    flags = _repacked(model)
    assert len(flags) == 14  # 2 layers x 7 projections; lm_head stays full precision
    assert set(flags) == {bool(bnb_functional.has_avx512bf16())}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_lora_trains_after_an_inference_forward(case):
    model, losses = _train(_model(CASES[case], evaluate_first=True))
    assert losses[-1] < losses[0] - 0.1, losses
    assert not any(_repacked(model))  # the layers training ran through are in the differentiable layout
    # the evaluation changes nothing about training: the same losses as without it
    _, plain = _train(_model(CASES[case], evaluate_first=False))
    assert losses == pytest.approx(plain, rel=1e-5)


def test_lora_trains_after_an_inference_mode_forward():
    # torch.inference_mode(): the repacked codes are inference tensors, which backward cannot save;
    # the unpacked ones are ordinary tensors
    model, losses = _train(_model(CASES["nf4-dq"], evaluate_first=True, under=torch.inference_mode))
    assert losses[-1] < losses[0] - 0.1, losses


def test_lora_trains_in_eval_mode_after_an_inference_forward():
    # training with the model left in eval mode (dropout off): a layer whose input needs no
    # gradient (the first q_proj / v_proj) may stay repacked, every other one must not
    model, losses = _train(_model(CASES["nf4"], evaluate_first=True), train_mode=False)
    assert losses[-1] < losses[0] - 0.1, losses
    base = model.get_base_model().model.layers
    assert not any(_repacked(base[1])) and not any(_repacked(base[0].mlp))


@pytest.mark.parametrize("case", ["nf4", "nf4-dq", "fp4"])
def test_inference_after_training_is_inference_before_it(case):
    model = _model(CASES[case], evaluate_first=False)
    with torch.no_grad():
        first = model.eval()(IDS).logits
    model, _ = _train(model, steps=2)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        again = model(IDS).logits
    assert torch.equal(again, first)  # same process, same kernel: repacked again from the exact state


@pytest.mark.parametrize("case", ["nf4", "nf4-dq", "fp4"])
def test_state_dict_after_a_forward_is_the_quantized_checkpoint(case):
    # bitsandbytes' own state_dict() of a repacked layer writes bfloat16-rounded scales and alters
    # the layer; quantplug's layers are unpacked exactly first (Transformers' save_pretrained calls it)
    model = _model(CASES[case], evaluate_first=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        first = model(IDS).logits
        after = model.state_dict()
        second = model(IDS).logits
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert torch.equal(first, second)
