"""The conformance kit on ``eetq``, with the checks that save a checkpoint replaced by what holds
instead: eetq refuses ``save`` (EETQ's on-disk layout is SM-specific and unverified here) and refuses
to read EETQ checkpoints, so the kit's save / reload / corrupt-file / offload checks cannot run; the
tests below check the refusals, and everything before the save (MoE experts quantized, logits
within the bound). ``spqr`` and ``higgs`` quantize nothing and read nothing: tests/test_refusals.py."""

from __future__ import annotations

import pytest
import torch

import quantplug
from quantplug.testing import BackendConformance

SAVE_REFUSED = "declares that its models cannot be saved"


class TestEetqConformance(BackendConformance):
    backend_name = "eetq"
    # one int8 code per weight and one float32 scale per row of the kit's 512-input layer
    configs = [({}, 8), ({"weights": "int8", "modules_to_not_convert": ["lm_head"]}, 8)]
    bad_configs = [
        ({"weights": "int4"}, "weights"),
        ({"weights": 8}, "weights"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
    ]

    def test_quantized_layer_stores_what_expected_tensors_declares(self, case):
        """There is no checkpoint layout to declare: ``expected_tensors`` (what a pre-quantized
        load plans from) refuses, naming the layer and why, while quantizing the layer works."""
        quantizer = quantplug.AutoQuantizer.from_config(self.make_config(case[0]))
        layer = quantizer.quantize_module("layer", torch.nn.Linear(512, 256))
        assert layer.codes.dtype == torch.int8 and layer.codes.shape == (256, 512)
        with pytest.raises(quantplug.BackendUnavailableError, match="'layer'.*SM") as err:
            quantizer.expected_tensors("layer", torch.nn.Linear(512, 256, device="meta"))
        assert "kernels-community/quantization-eetq" in str(err.value)

    def test_save_load_fresh_process_identical(self, case, tmp_path):
        """``save`` is refused before anything is written; the model still runs."""
        model, ids, _, _ = self._quantized_model(case[0])
        with pytest.raises(quantplug.CheckpointError, match=SAVE_REFUSED):
            quantplug.save(model, tmp_path / "ckpt")
        assert not (tmp_path / "ckpt").exists()
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()

    def test_disk_offload_matches_a_resident_load_or_is_refused(self, case, tmp_path):
        """No eetq checkpoint can be written to offload from: the save is refused."""
        model, _, _, _ = self._quantized_model(case[0])
        assert quantplug.AutoQuantizer.from_config(self.make_config(case[0])).offload_refusal()
        with pytest.raises(quantplug.CheckpointError, match=SAVE_REFUSED):
            quantplug.save(model, tmp_path / "ckpt")

    def test_corrupt_checkpoints_give_clear_errors(self, tmp_path):
        """Replaced: reading EETQ checkpoints (intact or not) is refused, tests/test_refusals.py."""
        model, _, _, _ = self._quantized_model(self.configs[0][0])
        with pytest.raises(quantplug.CheckpointError, match=SAVE_REFUSED):
            quantplug.save(model, tmp_path / "ckpt")

    def test_moe_every_expert_quantized_saved_per_expert_and_reloaded(self, moe_case, moe_arch, tmp_path):
        """Every expert projection is quantized (none left stacked) and the logits stay within the
        bound; the save is refused."""
        config, bits = moe_case
        model, ids, ref, report, _, _ = self._quantized_moe(config, moe_arch)
        cfg = model.config
        experts = cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts
        per_expert = [n for n in report.converted if ".experts." in n]
        assert len(per_expert) == cfg.num_hidden_layers * experts * 3, report
        assert not [k for k in report.skipped if "experts" in k], report.skipped
        with torch.no_grad():
            out = model(ids).logits
        bound = quantplug.get_backend("eetq").capabilities.max_rel_error[bits] * self.model_rel_error_factor
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all() and rel <= bound, f"{moe_arch}: logit error {rel:.4f}"
        with pytest.raises(quantplug.CheckpointError, match=SAVE_REFUSED):
            quantplug.save(model, tmp_path / "ckpt")
