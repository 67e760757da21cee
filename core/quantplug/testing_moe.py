"""The conformance kit's mixture-of-experts checks, inherited by ``BackendConformance``: for tiny
Mixtral, Qwen3-MoE and gpt-oss models (``quantplug.testing_models.tiny_moe``), every backend
quantizes every expert (none left stacked in full precision), the model shrinks as its bits say,
its logits stay within the backend's bound, and it saves in Transformers' per-expert layout and
loads back with identical logits. A backend needs no code of its own for this: the core unfuses
experts into per-expert ``nn.Linear`` modules (``quantplug.experts``)."""

from __future__ import annotations

from typing import Any, ClassVar

import quantplug

from .testing_models import tiny_moe


def _hf_keys(model) -> set[str]:
    """The tensor names Transformers' ``save_pretrained`` writes for ``model``: its per-expert
    weight names for the experts (through the model's conversion mapping), the rest as named."""
    from .sites import checkpoint_layout

    tensors = [(k, t) for k, t in model.state_dict().items()]
    return {k for k, _ in checkpoint_layout(model, tensors, {})[0]}


class MoEConformance:
    """Mixed into ``BackendConformance``; uses its ``configs``, ``make_config``,
    ``calibration_data``, ``max_overhead_bits`` and ``model_rel_error_factor``."""

    moe_configs: ClassVar[list[tuple[dict[str, Any], int]] | None] = None
    """(config dict, weight bits) for the MoE checks; default: the first of ``configs`` for each bit
    width (each check quantizes three models of 48 expert projections)."""
    moe_rel_error: ClassVar[dict[int, float]] = {}
    """Per bit width, a bound on the tiny MoE model's relative logit error to use instead of
    ``model_rel_error_factor`` times the one-layer bound (the issue's goal: 5% at 8 bits)."""

    def moe_cases(self) -> list[tuple[dict[str, Any], int]]:
        if self.moe_configs is not None:
            return list(self.moe_configs)
        first: dict[int, tuple[dict[str, Any], int]] = {}
        for config, bits in self.configs:
            first.setdefault(bits, (config, bits))
        return list(first.values())

    def _quantized_moe(self, config: dict[str, Any], arch: str):
        import torch

        model = tiny_moe(arch).to(self.device)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        ids = ids.to(self.device)
        with torch.no_grad():
            ref = model(ids).logits
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        hf_keys = _hf_keys(model)
        config = self.make_config(config)
        calibrate = quantplug.AutoQuantizer.from_config(config).needs_calibration()
        data = self.calibration_data(model) if calibrate else None
        report = quantplug.quantize(model, config, progress=False, calibration_data=data)
        return model, ids, ref, report, fp_bytes, hf_keys

    def test_moe_every_expert_quantized_saved_per_expert_and_reloaded(self, moe_case, moe_arch, tmp_path):
        """One config per bit width (the first ``configs`` lists): every expert projection is
        converted and none stays stacked, the model shrinks as its bits say, the logits stay within
        the bound, the checkpoint names each expert as Transformers does, and it loads identical."""
        import torch
        from safetensors import safe_open

        from .experts import experts_sites
        from .footprint import model_bytes
        from .sites import checkpoint_namer

        config, bits = moe_case
        model, ids, ref, report, fp_bytes, hf_keys = self._quantized_moe(config, moe_arch)
        cfg = model.config
        experts = cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts
        per_expert = [n for n in report.converted if ".experts." in n]
        native = set(model.quantplug_info.experts)  # sites the backend quantized stacked, whole
        assert native <= set(report.converted), report
        assert len(per_expert) + len(native) * experts * 3 == cfg.num_hidden_layers * experts * 3, report
        assert not experts_sites(model), "experts left stacked in full precision"
        assert not [k for k in report.skipped if "experts" in k], report.skipped
        ratio = model_bytes(model) / fp_bytes
        share = 0.16  # embeddings, head, norms and routers stay full precision: 16% of fp32 bytes
        assert ratio <= share + (1 - share) * (bits + self.max_overhead_bits) / 32, (
            f"model at {ratio:.3f} of fp32"
        )
        with torch.no_grad():
            out = model(ids).logits
        bound = self.moe_rel_error.get(bits) or (
            quantplug.get_backend(self.backend_name).capabilities.max_rel_error[bits]
            * self.model_rel_error_factor
        )
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(out).all() and rel <= bound, (
            f"{moe_arch}: logit error {rel:.4f} (bound {bound})"
        )

        ckpt = quantplug.save(model, tmp_path / "ckpt")
        stored: set[str] = set()
        for f in ckpt.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                stored |= set(fh.keys())
        # each quantized expert projection is stored under the checkpoint's name for it: the name
        # Transformers gives that expert's weight where it saves experts one by one (not gpt-oss)
        rename = checkpoint_namer(model)
        hf_per_expert = {k.rpartition(".")[0] for k in hf_keys if k.split(".experts.")[-1][:1].isdigit()}
        # native sites: stored per expert too, where Transformers saves them so (as its FP8Experts)
        expected = {rename(n) for n in per_expert} | {
            n for n in hf_per_expert if any(n.startswith(rename(site) + ".") for site in native)
        }
        assert all(any(s.startswith(n + ".") for s in stored) for n in expected), sorted(stored)[:12]
        assert not hf_per_expert or hf_per_expert == expected, sorted(hf_per_expert ^ expected)[:6]
        assert not [k for k in stored if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        loaded = quantplug.load(ckpt, device=self.device, progress=False)
        with torch.no_grad():
            again = loaded(ids).logits
        assert torch.equal(again, out), f"max abs diff {(again - out).abs().max().item()}"
