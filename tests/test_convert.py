"""The model walk (``quantplug.quantize`` / ``plan``): which layers are converted and which are
skipped (and why), the report, tied embeddings, GPT-2's ``Conv1D``, plain ``torch.nn`` models,
progress output and refusals that must leave the model untouched.

Everything runs on tiny random-weight models built locally with the reference plugin ``rtn``.
What the conformance kit (``quantplug.testing``) already checks per backend is not repeated here.
"""

from __future__ import annotations

import io
import sys

import pytest
import torch
from torch import nn

import quantplug
from quantplug.layers import plan
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug.walk import INFO_ATTR
from quantplug_rtn import RtnConfig
from quantplug_rtn.quantizer import RtnLinear

LLAMA_LINEARS = [
    f"model.layers.{i}.{part}"
    for i in range(2)
    for part in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 96, bias=False), nn.ReLU(), nn.Linear(96, 10)
    ).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def module_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


# -- what is converted ------------------------------------------------------------------------------


def test_tiny_llama_converts_every_linear_but_lm_head():
    model = tiny_llama()
    assert sorted(linear_names(model)) == sorted([*LLAMA_LINEARS, "lm_head"])
    ids = token_ids()
    ref = logits(model, ids)
    expected_before = sum(
        model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size()
        for n in LLAMA_LINEARS
    )

    report = quantplug.quantize(model, RtnConfig(bits=4), progress=False)

    assert report.backend == "rtn"
    assert report.config == RtnConfig(bits=4).to_dict()
    assert report.converted == LLAMA_LINEARS  # every Linear but the head, in model order
    assert list(report.skipped) == ["lm_head"]
    assert "output head" in report.skipped["lm_head"]
    assert "modules_to_not_convert" in report.skipped["lm_head"]  # says how to change it
    for name in LLAMA_LINEARS:
        assert isinstance(model.get_submodule(name), RtnLinear), name
    assert type(model.lm_head) is nn.Linear
    assert linear_names(model) == ["lm_head"]

    # bytes: exactly the converted layers' weights before, and what the backend stores after
    assert report.bytes_before == expected_before
    stored = sum(
        t.numel() * t.element_size()
        for n in LLAMA_LINEARS
        for t in model.get_submodule(n).state_dict().values()
    )
    assert report.bytes_after == stored
    assert report.bytes_after < report.bytes_before / 4  # int4 plus scales
    assert report.seconds >= 0

    text = str(report)
    assert "rtn" in text
    assert "converted 14 module(s)" in text
    assert "skipped 1" in text
    assert "skipped lm_head: output head" in text

    info = getattr(model, INFO_ATTR)
    assert info.modules == LLAMA_LINEARS and info.config == RtnConfig(bits=4)
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert 0 < rel_error(out, ref) < 0.5


def test_config_may_be_a_dict():
    model = tiny_llama()
    report = quantplug.quantize(model, {"quant_method": "rtn", "bits": 8, "group_size": -1}, progress=False)
    assert report.config == RtnConfig(bits=8, group_size=-1).to_dict()
    assert model.model.layers[0].mlp.up_proj.bits == 8
    assert getattr(model, INFO_ATTR).config == RtnConfig(bits=8, group_size=-1)


@pytest.mark.parametrize(
    ("patterns", "skipped"),
    [
        # a dotted component run skips every Linear under it
        pytest.param(["mlp"], [n for n in LLAMA_LINEARS if ".mlp." in n], id="component"),
        pytest.param(
            ["layers.0.mlp"], [n for n in LLAMA_LINEARS if n.startswith("model.layers.0.mlp.")], id="run"
        ),
        pytest.param(
            ["mlp.up_proj"], ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"], id="suffix"
        ),
        pytest.param(
            ["self_attn", "down_proj"],
            [n for n in LLAMA_LINEARS if "self_attn" in n or "down_proj" in n],
            id="several",
        ),
        # a full name skips exactly that module
        pytest.param(
            ["model.layers.1.self_attn.q_proj"], ["model.layers.1.self_attn.q_proj"], id="full-name"
        ),
        # whole components only: "proj" is not "q_proj", "layers.1.mlp.up" is not "...mlp.up_proj"
        pytest.param(["proj"], [], id="partial-component"),
        pytest.param(["layers.1.mlp.up"], [], id="partial-last-component"),
        pytest.param(["ayers"], [], id="infix"),
        # an empty list turns the defaults off too: the head is quantized
        pytest.param([], [], id="empty"),
    ],
)
def test_modules_to_not_convert(patterns, skipped):
    model = tiny_llama()
    report = quantplug.quantize(model, RtnConfig(bits=8, modules_to_not_convert=patterns), progress=False)
    # an explicit list replaces the default skips, so lm_head is converted in every case here
    assert report.skipped == dict.fromkeys(skipped, "listed in modules_to_not_convert")
    assert report.converted == [n for n in [*LLAMA_LINEARS, "lm_head"] if n not in skipped]
    for name in skipped:
        assert type(model.get_submodule(name)) is nn.Linear, name
    for name in report.converted:
        assert isinstance(model.get_submodule(name), RtnLinear), name
    out = logits(model, token_ids())
    assert torch.isfinite(out).all()


def test_tied_embeddings_keep_lm_head_tied():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = token_ids()
    report = quantplug.quantize(model, RtnConfig(bits=4), progress=False)
    assert "lm_head" in report.skipped and "lm_head" not in report.converted
    assert report.converted == LLAMA_LINEARS
    assert type(model.lm_head) is nn.Linear
    # not untied: the head still computes with the embedding's storage
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0].item() == 123.0
    assert torch.isfinite(logits(model, ids)).all()


def test_tied_weights_are_skipped_even_when_not_the_head():
    """A Linear whose weight is tied to an earlier parameter is left alone by default."""
    torch.manual_seed(0)
    shared = nn.Linear(96, 96, bias=False)
    model = nn.Sequential(nn.Linear(48, 96), shared, nn.ReLU(), nn.Linear(96, 96, bias=False)).eval()
    model[3].weight = shared.weight
    report = quantplug.quantize(model, RtnConfig(bits=8), progress=False)
    assert report.converted == ["0", "1"]
    assert report.skipped == {"3": "weight tied to 1.weight"}
    assert type(model[3]) is nn.Linear
    assert model[3].weight is shared.weight


def test_quantizing_twice_raises_config_error():
    model = tiny_llama()
    quantplug.quantize(model, RtnConfig(bits=4), progress=False)
    before = snapshot(model)
    types_before = module_types(model)
    with pytest.raises(quantplug.AlreadyQuantizedError, match="already quantized") as err:
        quantplug.quantize(model, RtnConfig(bits=8), progress=False)
    assert "'rtn'" in str(err.value)
    assert err.value.field == "quant_method"
    assert module_types(model) == types_before
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(model, INFO_ATTR).config == RtnConfig(bits=4)


def test_plan_matches_quantize_and_works_on_a_meta_skeleton():
    from transformers import LlamaForCausalLM

    config = RtnConfig(bits=4, modules_to_not_convert=None)
    quantizer = quantplug.AutoQuantizer.from_config(config)
    real = tiny_llama(tie_word_embeddings=True)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(real.config)
    planned = plan(skeleton, config, quantizer)
    assert planned == plan(real, config, quantizer)
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # plan changes nothing
    report = quantplug.quantize(real, config, progress=False)
    assert planned == (report.converted, report.skipped)


# -- GPT-2 (Conv1D) -----------------------------------------------------------------------------------


def test_gpt2_conv1d_layers_are_quantized_and_round_trip(tmp_path):
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    conv_names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv_names) == 8
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in conv_names}
    ids = token_ids(vocab=256)
    ref = logits(model, ids)

    report = quantplug.quantize(model, RtnConfig(bits=8, group_size=-1), progress=False)

    assert report.converted == conv_names
    assert list(report.skipped) == ["lm_head"]
    assert not [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, RtnLinear)
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)  # Conv1D stores [in, out]
    for name in conv_names:  # the weight was transposed, not reinterpreted
        w = originals[name].t()
        assert rel_error(model.get_submodule(name).dequantize(), w) < 0.02, name
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    out = logits(model, ids)
    assert rel_error(out, ref) < 0.05

    path = quantplug.save(model, tmp_path / "gpt2")
    loaded = quantplug.load(path, progress=False)
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    assert isinstance(loaded.transformer.h[1].mlp.c_proj, RtnLinear)
    assert torch.equal(logits(loaded, ids), out)
    gen = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


# -- plain torch --------------------------------------------------------------------------------------


def test_plain_sequential_mlp_quantize_save_load(tmp_path):
    model = mlp()
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    report = quantplug.quantize(model, RtnConfig(bits=8, group_size=32), progress=False)
    assert report.converted == ["0", "2", "4"]  # no output head to keep without Transformers
    assert report.skipped == {}
    with torch.no_grad():
        out = model(x)
    assert rel_error(out, ref) < 0.05

    path = quantplug.save(model, tmp_path / "mlp")
    fresh = mlp(seed=123)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), out)
    loaded = quantplug.load(path, model=fresh, progress=False)
    assert loaded is fresh
    assert [type(m) for m in loaded] == [RtnLinear, nn.GELU, RtnLinear, nn.ReLU, RtnLinear]
    assert loaded[2].bias is None and loaded[2].group_size == 32
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    assert getattr(loaded, INFO_ATTR).modules == ["0", "2", "4"]


# -- generate -----------------------------------------------------------------------------------------


def test_generate_works_after_quantize_and_after_load(tmp_path):
    model = tiny_llama()
    quantplug.quantize(model, RtnConfig(bits=4, group_size=32, symmetric=False), progress=False)
    prompt = token_ids(shape=(2, 5))
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert gen.shape == (2, 11)
    assert torch.equal(gen[:, :5], prompt)
    loaded = quantplug.load(quantplug.save(model, tmp_path / "ckpt"), progress=False)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), gen)


# -- progress -----------------------------------------------------------------------------------------


def test_progress_prints_nothing_when_stderr_is_not_a_tty(capfd):
    model = tiny_llama()
    capfd.readouterr()  # whatever building the model logged
    assert not sys.stderr.isatty()
    quantplug.quantize(model, RtnConfig(bits=4), progress=True)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_progress_bar_is_shown_on_a_tty(monkeypatch):
    """The control for the test above: the same call on a terminal does draw a bar."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model = tiny_llama()
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    quantplug.quantize(model, RtnConfig(bits=4), progress=True)
    assert "quantizing (rtn)" in term.getvalue()

    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    quantplug.quantize(tiny_llama(), RtnConfig(bits=4), progress=False)
    assert quiet.getvalue() == ""


# -- refusals leave the model untouched ------------------------------------------------------------


@pytest.mark.parametrize("device", ["xpu", "meta", torch.device("xpu", 0)])
def test_unsupported_device_is_refused_before_any_change(device):
    model = tiny_llama()
    before = snapshot(model)
    types_before = module_types(model)
    with pytest.raises(quantplug.BackendUnavailableError, match="does not run on") as err:
        quantplug.quantize(model, RtnConfig(bits=4), device=device, progress=False)
    assert "cpu" in str(err.value)  # says what is supported
    assert module_types(model) == types_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)
    assert getattr(model, INFO_ATTR, None) is None
    # nothing half-done: the same model still quantizes normally afterwards
    assert quantplug.quantize(model, RtnConfig(bits=4), progress=False).converted == LLAMA_LINEARS


def test_unknown_method_is_refused_before_any_change():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(quantplug.UnknownMethodError, match="no-such-method"):
        quantplug.quantize(model, {"quant_method": "no-such-method"}, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert getattr(model, INFO_ATTR, None) is None


def test_a_quantized_model_deep_copies_and_pickles(tmp_path):
    """Its quantization info (backend descriptor, read-only mappings included) copies with it: the
    copy computes the same logits and saves as the original does."""
    import copy
    import pickle

    model = tiny_llama()
    quantplug.quantize(model, RtnConfig(bits=8, group_size=-1), progress=False)
    ids = token_ids()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(twin, ids), logits(model, ids))
        caps = getattr(twin, INFO_ATTR).quantizer.backend.capabilities
        assert dict(caps.max_rel_error) == dict(
            getattr(model, INFO_ATTR).quantizer.backend.capabilities.max_rel_error
        )
        with pytest.raises(TypeError):
            caps.max_rel_error[8] = 1.0  # still read-only
    saved = quantplug.save(copy.deepcopy(model), tmp_path / "copy")
    assert torch.equal(logits(quantplug.load(saved, progress=False), ids), logits(model, ids))
