"""``LoadOnlyConformance``: the conformance kit of a backend that loads checkpoints other tools
wrote and does not quantize (``Capabilities(quantizes=False)``: AQLM, VPTQ, Quark, ...).

    # plugins/mybackend/tests/test_conformance.py
    from quantplug.testing import LoadOnlyConformance

    class TestMyLoader(LoadOnlyConformance):
        backend_name = "mymethod"
        configs = [{"bits": 2}]                       # quantization_config dicts its checkpoints carry
        bad_configs = [({"bits": 3}, "bits")]         # (config dict, field the error names)
        library_modules = ("mylib",)                  # must stay unimported by listing

        def write_checkpoint(self, folder, config):
            ...  # a tiny model's checkpoint, written with the method's own (reference) code
            return ids, reference_logits              # what the method's reference computes for ids

It checks registration, that listing and config validation stay light, config round trips and
``ConfigError``s, that ``quantize`` is refused with the reason before any layer changes, that each
checkpoint loads with the reference's logits (relative difference ``<= tolerance``), loads the same
in a fresh process, saves back bit for bit (where the backend is serializable) and that a
truncated file, a missing tensor and an unknown method give clear errors. Needs pytest, torch,
transformers and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

import quantplug

from .testing_checks import assert_listing_is_light, load_and_dump


class LoadOnlyConformance:
    """Base class of a load-only backend's conformance tests (not collected itself: no ``Test`` prefix)."""

    backend_name: ClassVar[str]
    configs: ClassVar[list[dict[str, Any]]]
    bad_configs: ClassVar[list[tuple[dict[str, Any], str]]] = []
    library_modules: ClassVar[tuple[str, ...]] = ()
    tolerance: ClassVar[float] = 1e-3
    """Largest ``||logits - reference|| / ||reference||`` a load may give."""

    def write_checkpoint(self, folder: Path, config: dict[str, Any]):
        """Write a checkpoint with quantization config ``config`` in ``folder`` (``config.json`` and
        safetensors, a tiny model), made with the method's own code; return ``(ids, logits)``: token
        ids [batch, tokens] and the logits the method's reference implementation computes for them."""
        raise NotImplementedError

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            ids = [json.dumps(c, sort_keys=True, separators=(",", ":")) for c in self.configs]
            metafunc.parametrize("case", self.configs, ids=ids)
        if "bad_case" in metafunc.fixturenames:
            if not self.bad_configs:
                skip = pytest.mark.skip(reason="no bad_configs declared")
                metafunc.parametrize("bad_case", [pytest.param(None, marks=skip)], ids=["none"])
            else:
                ids = [json.dumps(c, sort_keys=True, separators=(",", ":")) for c, _ in self.bad_configs]
                metafunc.parametrize("bad_case", self.bad_configs, ids=ids)

    def make_config(self, config: dict[str, Any]) -> quantplug.QuantConfig:
        return quantplug.config_from_dict({"quant_method": self.backend_name, **config})

    def _written(self, tmp_path: Path, case: dict[str, Any]):
        folder = tmp_path / "written"
        folder.mkdir(parents=True)
        ids, ref = self.write_checkpoint(folder, case)
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == self.backend_name
        return folder, ids, ref

    @staticmethod
    def _rel(out, ref) -> float:
        return float((out.float() - ref.float()).norm() / ref.float().norm())

    # -- registration and configs -------------------------------------------------------------

    def test_registered_and_load_only(self):
        backend = quantplug.get_backend(self.backend_name)
        assert backend.plugin, "the backend must come from an installed distribution"
        assert backend.available, f"{self.backend_name} unavailable: {backend.status.reason}"
        assert not backend.capabilities.quantizes, (
            "a load-only backend declares Capabilities(quantizes=False)"
        )
        assert not [p for p in quantplug.problems() if p.backend == self.backend_name]

    def test_listing_and_config_validation_import_nothing_heavy(self, case):
        assert_listing_is_light(self.backend_name, case, self.library_modules)

    def test_config_round_trip(self, case):
        config = self.make_config(case)
        assert type(config).from_dict(config.to_dict()) == config
        assert quantplug.config_from_dict(json.loads(config.to_json())) == config

    def test_bad_config_raises_config_error(self, bad_case):
        data, field = bad_case
        with pytest.raises(quantplug.ConfigError) as err:
            self.make_config(data)
        assert err.value.field == field and field in str(err.value)

    def test_quantize_is_refused_with_the_reason(self, case):
        import torch

        from .testing_models import tiny_llama

        model = tiny_llama()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(quantplug.QuantplugError, match="quantiz"):
            quantplug.quantize(model, self.make_config(case), progress=False)
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # -- checkpoints ----------------------------------------------------------------------------

    def test_loads_with_the_reference_logits(self, case, tmp_path):
        import torch

        folder, ids, ref = self._written(tmp_path, case)
        model = quantplug.load(folder, progress=False)
        with torch.no_grad():
            out = model(ids).logits
        assert torch.isfinite(out).all()
        rel = self._rel(out, ref)
        assert rel <= self.tolerance, (
            f"logits differ from the reference by {rel:.2e} (allowed {self.tolerance})"
        )

    def test_fresh_process_load_is_identical(self, case, tmp_path):
        import torch
        from safetensors.torch import load_file, save_file

        folder, ids, _ = self._written(tmp_path, case)
        with torch.no_grad():
            here = quantplug.load(folder, progress=False)(ids).logits
        save_file({"ids": ids.cpu()}, tmp_path / "ids.safetensors")
        load_and_dump(folder, tmp_path / "ids.safetensors", tmp_path / "out.safetensors")
        there = load_file(tmp_path / "out.safetensors")["logits"]
        assert torch.equal(there, here.cpu())

    def test_saves_back_bit_for_bit_or_refuses(self, case, tmp_path):
        import torch
        from safetensors.torch import load_file

        folder, ids, _ = self._written(tmp_path, case)
        model = quantplug.load(folder, progress=False)
        if not quantplug.get_backend(self.backend_name).capabilities.serializable:
            with pytest.raises(quantplug.QuantplugError):
                quantplug.save(model, tmp_path / "again")
            return
        again = quantplug.save(model, tmp_path / "again")
        theirs = {}
        for f in sorted(folder.glob("*.safetensors")):
            theirs.update(load_file(f))
        ours = {}
        for f in sorted(again.glob("*.safetensors")):
            ours.update(load_file(f))
        assert sorted(ours) == sorted(theirs)
        different = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
        assert not different, f"saved tensors differ from the checkpoint's: {different[:5]}"
        with torch.no_grad():
            assert torch.equal(quantplug.load(again, progress=False)(ids).logits, model(ids).logits)

    def test_bad_checkpoints_give_clear_errors(self, tmp_path):
        from safetensors.torch import load_file, save_file

        from .walk import quantized_info

        folder, _, _ = self._written(tmp_path, self.configs[0])
        layer = quantized_info(quantplug.load(folder, progress=False)).modules[0]
        files = sorted(folder.glob("*.safetensors"))
        where = next(f for f in files if any(k.startswith(layer + ".") for k in load_file(f)))
        state = load_file(where)
        key = sorted(k for k in state if k.startswith(layer + "."))[0]
        del state[key]
        save_file(state, where, metadata={"format": "pt"})
        with pytest.raises(quantplug.CheckpointError, match=key):
            quantplug.load(folder, progress=False)

        folder, _, _ = self._written(tmp_path / "b", self.configs[0])
        files = sorted(folder.glob("*.safetensors"))
        data = files[0].read_bytes()
        files[0].write_bytes(data[: len(data) - 100])
        with pytest.raises(quantplug.CheckpointError, match=files[0].name):
            quantplug.load(folder, progress=False)

        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["quant_method"] = "no-such-method"
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(quantplug.UnknownMethodError, match="no-such-method"):
            quantplug.load(folder, progress=False)
