"""The conformance kit: one pytest base class that every backend plugin's tests subclass.

    # plugins/mybackend/tests/test_conformance.py
    from quantplug.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend_name = "mymethod"
        configs = [({"bits": 4}, 4), ({"bits": 8}, 8)]         # (config dict, weight bits)
        bad_configs = [({"bits": 3}, "bits")]                    # (config dict, field the error names)
        library_bad_configs = [({"bits": 4, "group_size": 7}, "group_size")]  # refused by check_config
        library_modules = ("mylib",)                             # must stay unimported by listing

It checks the plugin contract the same way for every backend: registration and lazy import,
config round trips and ``ConfigError``s (at construction for ``bad_configs``; for
``library_bad_configs``, which build, at ``Quantizer.check_config`` before any layer is touched),
that a quantized layer stores exactly the tensors ``expected_tensors`` declares (so what
``quantize`` writes is what ``load`` accepts), one-layer error within ``Capabilities.max_rel_error``
and storage near the declared bits, each preset's declared ``bits``, ``bits_per_weight`` and
``rel_error`` against what its own layer measures (``quantplug.preset_check`` states the layer and
the tolerances), a tiny Transformers model quantized and still generating, save -> load in a fresh
process with identical logits, a layer offloaded to disk by ``load(device_map=)`` with identical
logits (or, where ``offload_refusal`` says it cannot be, a clear refusal), and clear errors for
corrupt checkpoints; and, for tiny Mixtral, Qwen3-MoE and gpt-oss models, that every expert is
quantized and the model saves per expert and loads back identical (``quantplug.testing_moe``).
Needs pytest, torch and transformers.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

import quantplug

from .preset_check import check_preset, figure_problems, measure_preset  # noqa: F401 (public)
from .testing_checks import assert_listing_is_light, load_and_dump
from .testing_loadonly import LoadOnlyConformance  # noqa: F401 (public)
from .testing_models import MOE_ARCHS, logits, tiny_llama, tiny_moe, token_ids  # noqa: F401 (public)
from .testing_moe import MoEConformance


class BackendConformance(MoEConformance):
    """Base class of a backend's conformance tests (not collected itself: no ``Test`` prefix)."""

    backend_name: ClassVar[str]
    configs: ClassVar[list[tuple[dict[str, Any], int]]]
    bad_configs: ClassVar[list[tuple[dict[str, Any], str]]] = []
    """(config dict, field the error names): refused when the config is built."""
    library_bad_configs: ClassVar[list[tuple[dict[str, Any], str]]] = []
    """(config dict, field the error names): the config builds (cheap checks pass), and the backend's
    ``Quantizer.check_config`` refuses it once the library is imported."""
    library_modules: ClassVar[tuple[str, ...]] = ()
    device: ClassVar[str] = "cpu"
    max_overhead_bits: ClassVar[float] = 1.5
    """Stored bits per weight may exceed the nominal bits by this much (scales, zero points)."""
    model_rel_error_factor: ClassVar[float] = 4.0
    """Logit error of the tiny model may be this multiple of the one-layer bound."""

    # -- parametrization ------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            ids = [json.dumps(c, sort_keys=True, separators=(",", ":")) for c, _ in self.configs]
            metafunc.parametrize("case", self.configs, ids=ids)
        if "preset_name" in metafunc.fixturenames:
            try:
                names = [p.name for p in quantplug.get_backend(self.backend_name).presets]
            except quantplug.QuantplugError:  # test_registered_and_available says why
                names = []
            none = pytest.param(None, marks=pytest.mark.skip(reason="the backend declares no presets"))
            metafunc.parametrize("preset_name", names or [none], ids=names or ["none"])
        if "moe_case" in metafunc.fixturenames:
            cases = self.moe_cases()
            metafunc.parametrize(
                "moe_case",
                cases,
                ids=[json.dumps(c, sort_keys=True, separators=(",", ":")) for c, _ in cases],
            )
            metafunc.parametrize("moe_arch", MOE_ARCHS)
        for fixture, cases in (
            ("bad_case", self.bad_configs),
            ("library_bad_case", self.library_bad_configs),
        ):
            if fixture not in metafunc.fixturenames:
                continue
            if not cases:  # skips this test only, not the whole class
                skip = pytest.mark.skip(reason=f"no {fixture.replace('_case', '_configs')} declared")
                metafunc.parametrize(fixture, [pytest.param(None, marks=skip)], ids=["none"])
                continue
            ids = [json.dumps(c, sort_keys=True, separators=(",", ":")) for c, _ in cases]
            metafunc.parametrize(fixture, cases, ids=ids)

    def make_config(self, config: dict[str, Any]) -> quantplug.QuantConfig:
        return quantplug.config_from_dict({"quant_method": self.backend_name, **config})

    def make_model(self):
        """The tiny Transformers model used by the model-level checks; override to change it."""
        return tiny_llama()

    # -- registration and lazy import ---------------------------------------------------------

    def test_registered_and_available(self):
        backend = quantplug.get_backend(self.backend_name)
        assert backend.plugin, "the backend must come from an installed distribution"
        assert backend.available, (
            f"{self.backend_name} unavailable: {backend.status.reason} (fix: {backend.status.fix})"
        )
        assert not [p for p in quantplug.problems() if p.backend == self.backend_name]

    def test_listing_and_config_validation_import_nothing_heavy(self, case):
        assert_listing_is_light(self.backend_name, case[0], self.library_modules)

    # -- configs ------------------------------------------------------------------------------

    def test_config_round_trip(self, case):
        config = self.make_config(case[0])
        assert type(config).from_dict(config.to_dict()) == config
        assert type(config).from_json(config.to_json()) == config
        assert quantplug.config_from_dict(json.loads(config.to_json())) == config

    def test_bad_config_raises_config_error(self, bad_case):
        data, field = bad_case
        with pytest.raises(quantplug.ConfigError) as err:
            self.make_config(data)
        assert err.value.field == field
        assert field in str(err.value)

    def test_library_refusal_is_a_config_error_before_any_layer_changes(self, library_bad_case):
        import torch

        data, field = library_bad_case
        config = self.make_config(data)  # the cheap checks pass
        with pytest.raises(quantplug.ConfigError) as err:
            quantplug.AutoQuantizer.from_config(config)
        assert err.value.field == field and field in str(err.value)
        model = self.make_model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(quantplug.ConfigError):
            quantplug.quantize(model, config, progress=False)
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def test_unknown_key_raises_config_error(self):
        with pytest.raises(quantplug.ConfigError, match="no_such_key"):
            self.make_config({**self.configs[0][0], "no_such_key": 1})

    # -- one layer ----------------------------------------------------------------------------

    def test_layer_error_and_bytes(self, case):
        import torch

        config, bits = case
        bound = quantplug.get_backend(self.backend_name).capabilities.max_rel_error.get(bits)
        assert bound is not None, f"Capabilities.max_rel_error declares no bound for {bits} bits"
        torch.manual_seed(0)
        layer = torch.nn.Linear(512, 256, bias=True, device=self.device)
        torch.nn.init.normal_(layer.weight, std=0.02)
        x = torch.randn(32, 512, device=self.device)
        with torch.no_grad():
            ref = layer(x)
        quantizer, qlayer = self._quantized_layer(config, layer)
        with torch.no_grad():
            out = qlayer(x)
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel <= bound, (
            f"relative output error {rel:.4f} exceeds the declared bound {bound} at {bits} bits"
        )
        stored = quantizer.module_tensors("layer", qlayer)
        weight_bits = (
            8
            * sum(t.numel() * t.element_size() for k, t in stored.items() if k != "bias")
            / layer.weight.numel()
        )
        assert bits <= weight_bits + 0.01, (
            f"{weight_bits:.2f} stored bits per weight is below the nominal {bits}"
        )
        assert weight_bits <= bits + self.max_overhead_bits, (
            f"{weight_bits:.2f} stored bits per weight; nominal {bits} + {self.max_overhead_bits} overhead allowed"
        )

    def test_preset_figures_are_what_its_layer_measures(self, preset_name):
        """Its declared bits, bits per weight and error hold on its layer (``preset_check``)."""
        skip, problems = check_preset(quantplug.get_backend(self.backend_name), preset_name, self.device)
        if skip:
            pytest.skip(skip)
        assert not problems, "\n".join(problems)

    def test_quantized_layer_stores_what_expected_tensors_declares(self, case):
        import torch

        torch.manual_seed(0)
        for bias in (True, False):
            layer = torch.nn.Linear(512, 256, bias=bias, device=self.device)
            meta = torch.nn.Linear(512, 256, bias=bias, device="meta")
            quantizer, qlayer = self._quantized_layer(case[0], layer)
            stored = quantizer.module_tensors("layer", qlayer)
            expected = quantizer.expected_tensors("layer", meta)
            assert sorted(stored) == sorted(expected), (
                "quantize_module's tensors are not what a checkpoint must hold"
            )
            for key, (shape, dtype) in expected.items():
                t = stored[key]
                assert shape is None or tuple(t.shape) == tuple(shape), (
                    f"{key}: {list(t.shape)} != {list(shape)}"
                )
                assert dtype is None or t.dtype == dtype, f"{key}: {t.dtype} != {dtype}"

    def _quantized_layer(self, config, layer):
        """``(quantizer, quantized layer)``: through ``quantize_module``, or, for a config that needs
        calibration, through ``quantplug.quantize`` of a one-layer model calibrated on other inputs
        of the same distribution as the test's."""
        import torch

        config = self.make_config(config)
        quantizer = quantplug.AutoQuantizer.from_config(config)
        if not quantizer.needs_calibration():
            with torch.no_grad():
                return quantizer, quantizer.quantize_module("layer", layer)
        model = torch.nn.Sequential(layer)
        gen = torch.Generator().manual_seed(7)
        calib = [torch.randn(32, layer.in_features, generator=gen).to(self.device) for _ in range(4)]
        from .walk import quantized_info

        quantplug.quantize(model, config, progress=False, calibration_data=calib)
        return quantized_info(model).quantizer, model[0]

    # -- a model ------------------------------------------------------------------------------

    def calibration_data(self, model) -> list:
        """Calibration batches for configs that need them: token ids other than the test's."""
        import torch

        gen = torch.Generator().manual_seed(7)
        vocab = model.config.vocab_size
        return [torch.randint(0, vocab, (2, 16), generator=gen).to(self.device) for _ in range(2)]

    def _quantized_model(self, config):
        import torch

        model = self.make_model().to(self.device)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        ids = ids.to(self.device)
        with torch.no_grad():
            ref = model(ids).logits
        config = self.make_config(config)
        calibrate = quantplug.AutoQuantizer.from_config(config).needs_calibration()
        data = self.calibration_data(model) if calibrate else None
        report = quantplug.quantize(model, config, progress=False, calibration_data=data)
        return model, ids, ref, report

    def test_quantize_model(self, case):
        import torch

        config, bits = case
        model, ids, ref, report = self._quantized_model(config)
        assert report.converted, "no module was quantized"
        assert "lm_head" in report.skipped and "lm_head" not in report.converted
        assert report.bytes_after < report.bytes_before
        with torch.no_grad():
            out = model(ids).logits
        bound = quantplug.get_backend(self.backend_name).capabilities.max_rel_error[bits]
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all()
        assert rel <= bound * self.model_rel_error_factor, f"logit error {rel:.4f} (layer bound {bound})"
        gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        assert gen.shape == (1, 7)

    def test_save_load_fresh_process_identical(self, case, tmp_path):
        import torch
        from safetensors.torch import load_file, save_file

        model, ids, _, _ = self._quantized_model(case[0])
        with torch.no_grad():
            out = model(ids).logits
        ckpt = quantplug.save(model, tmp_path / "ckpt")
        names = sorted(p.name for p in ckpt.iterdir())
        assert all(n.endswith((".json", ".safetensors")) for n in names), names
        save_file({"ids": ids.cpu()}, tmp_path / "ids.safetensors")
        load_and_dump(ckpt, tmp_path / "ids.safetensors", tmp_path / "out.safetensors")
        loaded = load_file(tmp_path / "out.safetensors")["logits"]
        assert torch.equal(loaded, out.cpu()), f"max abs diff {(loaded - out.cpu()).abs().max().item()}"

    def test_disk_offload_matches_a_resident_load_or_is_refused(self, case, tmp_path):
        """``Quantizer.offload_refusal() is None`` holds: a decoder layer offloaded to disk by
        ``load(device_map=)`` gives the resident load's logits; otherwise the load is refused,
        naming the layer and the backend, before anything is written."""
        import torch

        pytest.importorskip("accelerate")
        model, ids, _, report = self._quantized_model(case[0])
        ckpt = quantplug.save(model, tmp_path / "ckpt")
        with torch.no_grad():
            ref = quantplug.load(ckpt, device=self.device, progress=False)(ids).logits
        block = ".".join(report.converted[-1].split(".")[:3])  # e.g. model.layers.1
        kwargs = {"device_map": {"": self.device, block: "disk"}, "offload_folder": tmp_path / "off"}
        if quantplug.AutoQuantizer.from_config(self.make_config(case[0])).offload_refusal() is not None:
            with pytest.raises(quantplug.ConfigError, match="cannot be offloaded") as err:
                quantplug.load(ckpt, progress=False, **kwargs)
            assert f"'{block}." in str(err.value) and repr(self.backend_name) in str(err.value)
            assert not any((tmp_path / "off").iterdir())
            return
        offloaded = quantplug.load(ckpt, progress=False, **kwargs)
        assert offloaded.hf_device_map[block] == "disk"
        assert (tmp_path / "off" / "index.json").exists()
        with torch.no_grad():
            out = offloaded(ids).logits
        assert torch.equal(out, ref), f"max abs diff {(out - ref).abs().max().item()}"

    def test_corrupt_checkpoints_give_clear_errors(self, tmp_path):
        model, _, _, _ = self._quantized_model(self.configs[0][0])
        ckpt = quantplug.save(model, tmp_path / "ckpt")
        config = json.loads((ckpt / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == self.backend_name

        config["quantization_config"]["quant_method"] = "no-such-method"
        (ckpt / "config.json").write_text(json.dumps(config))
        with pytest.raises(quantplug.UnknownMethodError, match="no-such-method"):
            quantplug.load(ckpt, progress=False)

        config["quantization_config"]["quant_method"] = self.backend_name
        (ckpt / "config.json").write_text(json.dumps(config))
        weights = ckpt / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
        with pytest.raises(quantplug.CheckpointError, match="model.safetensors"):
            quantplug.load(ckpt, progress=False)

    def test_unsupported_device_is_refused(self):
        quantizer = quantplug.AutoQuantizer.from_config(self.make_config(self.configs[0][0]))
        with pytest.raises(quantplug.BackendUnavailableError, match="does not run on"):
            quantizer.validate_environment("no-such-device")
