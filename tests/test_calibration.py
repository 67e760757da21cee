"""Calibration: ``quantplug.quantize(model, config, calibration_data=...)`` and the quantizer's
``needs_calibration()`` / ``calibrate(model, batches)`` hooks.

A tiny programmatic backend here scales each layer's output by a factor fitted from data (the
mean absolute input it saw), so calibration visibly changes what the model computes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import quantplug


class ScaledLinear(nn.Module):
    """A Linear with a per-layer ``act_scale`` buffer that calibration fills."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.register_buffer("act_scale", torch.zeros(()))
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self.linear(x) * (1 + self.act_scale)


#: the batches each CalibQuantizer.calibrate call was given, in order (compare quantizes copies)
CALIBRATED_ON: list[list] = []


class CalibQuantizer(quantplug.Quantizer):
    """Needs calibration when ``config.calibrated``; records the batches it was given."""

    def needs_calibration(self) -> bool:
        return self.config.calibrated

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        return ScaledLinear(module)

    def calibrate(self, model: nn.Module, batches: list) -> None:
        self.batches = batches
        CALIBRATED_ON.append(batches)
        self.grad_enabled = torch.is_grad_enabled()
        inputs = {}
        hooks = [
            m.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, []).append(a[0].abs().mean()))
            for m in model.modules()
            if isinstance(m, ScaledLinear)
        ]
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
        for h in hooks:
            h.remove()
        for m, xs in inputs.items():
            m.act_scale.fill_(torch.stack(xs).mean())


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, *, shift: float = 0.0) -> torch.Tensor:
        return self.b(torch.relu(self.a(x + shift)))


@pytest.fixture
def calib_backend(make_config_class):
    name = "test-calib"

    @dataclasses.dataclass(frozen=True)
    class CalibConfig(quantplug.QuantConfig):
        quant_method = name
        calibrated: bool = True

    quantplug.register_backend(
        quantplug.Backend(
            name=name,
            config=CalibConfig,
            quantizer=f"{__name__}:CalibQuantizer",
            capabilities=quantplug.Capabilities(bits=(8,)),
        )
    )
    return CalibConfig


def test_calibrate_runs_after_the_walk_with_batches_on_the_target_device(calib_backend):
    model = Model()
    batches = [torch.randn(3, 8), {"x": torch.randn(2, 8), "shift": 1.0}]
    report = quantplug.quantize(model, calib_backend(), calibration_data=iter(batches), progress=False)
    assert report.converted == ["a", "b"]
    quantizer = model.quantplug_info.quantizer
    assert len(quantizer.batches) == 2 and quantizer.grad_enabled is False
    assert torch.equal(quantizer.batches[0], batches[0])
    assert quantizer.batches[1]["shift"] == 1.0
    # every converted layer saw both batches and got a fitted, nonzero scale
    assert model.a.seen == 2 and model.b.seen == 2
    assert model.a.act_scale.item() > 0 and model.b.act_scale.item() > 0
    assert model.a.act_scale.item() != model.b.act_scale.item()


def test_config_that_needs_calibration_without_data_is_a_config_error(calib_backend):
    model = Model()
    with pytest.raises(quantplug.ConfigError, match="calibration_data=") as err:
        quantplug.quantize(model, calib_backend(), progress=False)
    assert err.value.field == "calibration_data"
    assert isinstance(model.a, nn.Linear) and type(model.a) is nn.Linear  # nothing was replaced


def test_data_for_a_config_that_needs_none_is_refused(calib_backend):
    model = Model()
    with pytest.raises(quantplug.ConfigError, match="takes no calibration data") as err:
        quantplug.quantize(
            model, calib_backend(calibrated=False), calibration_data=[torch.randn(1, 8)], progress=False
        )
    assert err.value.field == "calibration_data"
    assert type(model.a) is nn.Linear


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "empty"),
        (torch.randn(2, 8), "wrap one batch in a list"),
        ({"x": torch.randn(2, 8)}, "wrap one batch in a list"),
        ([torch.randn(2, 8), [1, 2]], "batch 1 is a list"),
    ],
)
def test_bad_calibration_data_is_a_config_error(calib_backend, data, match):
    model = Model()
    with pytest.raises(quantplug.ConfigError, match=match) as err:
        quantplug.quantize(model, calib_backend(), calibration_data=data, progress=False)
    assert err.value.field == "calibration_data"
    assert type(model.a) is nn.Linear


def test_backends_without_calibration_refuse_data(make_backend):
    quantplug.register_backend(make_backend("test-plain"))
    with pytest.raises(quantplug.ConfigError, match="takes no calibration data"):
        quantplug.quantize(
            Model(), {"quant_method": "test-plain"}, calibration_data=[torch.randn(1, 8)], progress=False
        )


def test_default_needs_calibration_follows_capabilities_and_calibrate_is_required(make_backend):
    backend = make_backend(
        "test-needs", capabilities=quantplug.Capabilities(bits=(4,), needs_calibration=True)
    )
    quantplug.register_backend(backend)
    quantizer = quantplug.AutoQuantizer.from_config({"quant_method": "test-needs"})
    assert quantizer.needs_calibration() is True
    with pytest.raises(quantplug.PluginError, match="does not implement calibrate"):
        quantizer.calibrate(Model(), [torch.randn(1, 8)])
    plain = make_backend("test-plain2")
    quantplug.register_backend(plain)
    assert quantplug.AutoQuantizer.from_config({"quant_method": "test-plain2"}).needs_calibration() is False


def test_quantize_on_load_refuses_a_config_that_needs_calibration(calib_backend, tmp_path):
    ckpt = quantplug.save(Model(), tmp_path / "fp")
    with pytest.raises(quantplug.ConfigError, match="quantize-on-load cannot") as err:
        quantplug.load(ckpt, config=calib_backend(), model=Model(), progress=False)
    assert err.value.field == "calibration_data"


def test_run_batch_passes_a_tensor_positionally_and_a_mapping_as_keywords():
    from quantplug.testing import logits, tiny_llama, token_ids

    model = tiny_llama()
    ids = token_ids()
    expected = logits(model, ids)
    with torch.no_grad():
        assert torch.equal(quantplug.run_batch(model, ids).logits, expected)
        assert torch.equal(quantplug.run_batch(model, {"input_ids": ids}).logits, expected)
        out = quantplug.run_batch(model, {"input_ids": ids}, output_hidden_states=True)
    assert out.hidden_states is not None  # extra keyword arguments reach the model


def test_compare_calibrates_on_text_after_every_token_it_evaluates(calib_backend):
    from quantplug.report import to_markdown
    from quantplug.testing import tiny_llama
    from quantplug.text_quality import default_text, encode

    CALIBRATED_ON.clear()
    result = quantplug.compare(
        tiny_llama(),
        [calib_backend(), "rtn:int8"],
        tokens=64,
        window=32,
        prefill_tokens=16,
        decode_tokens=2,
        repeats=1,
        calibration_tokens=80,
        dtype="float32",
        log=lambda msg: None,
    )
    assert [r.error for r in result.rows] == [None, None, None]
    assert len(CALIBRATED_ON) == 1  # rtn takes no calibration data, and gets none
    seen = torch.cat([b.flatten().cpu() for b in CALIBRATED_ON[0]])
    text_ids, _ = encode(default_text(), None, 384, 65 + 80)
    assert torch.equal(seen, text_ids[65:145])  # the 80 tokens after the 65 evaluated and timed
    assert [b.shape[-1] for b in CALIBRATED_ON[0]] == [32, 32, 16]  # window-sized batches
    assert "tokens 65..144" in result.settings["calibration"]
    assert "Calibration: candidates that need calibration data got 80 tokens" in to_markdown(result)


def test_compare_without_text_gives_calibrating_candidates_an_error_not_their_test_data(calib_backend):
    model = Model()
    result = quantplug.compare(
        model, [calib_backend()], inputs=torch.randn(2, 8), decode_tokens=1, repeats=1, dtype="float32",
        log=lambda msg: None,
    )  # fmt: skip
    assert "needs calibration data" in result.rows[1].error
    assert "inputs= given" in result.rows[1].error
