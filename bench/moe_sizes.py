"""Issue 29's goal table: each of five backends' 8-bit preset on tiny Mixtral, Qwen3-MoE and gpt-oss
(``quantplug.testing_models.tiny_moe``): expert projections quantized, model bytes over fp32,
relative logit error, and whether save -> load gives identical logits. Prints a Markdown table.

    python bench/moe_sizes.py      # the integration env (all five plugins installed), ~1 min
"""

from __future__ import annotations

import logging
import tempfile
import warnings

import torch

import quantplug
from quantplug.experts import experts_sites
from quantplug.footprint import model_bytes
from quantplug.testing_models import MOE_ARCHS, tiny_moe

PRESETS = [
    ("rtn", "int8"),
    ("bitsandbytes", "int8"),
    ("hqq", "8bit-g64"),
    ("quanto", "int8"),
    ("torchao", "int8-weight-only"),
]


def preset_config(backend: str, name: str):
    config = next(p for p in quantplug.get_backend(backend).presets if p.name == name).config
    return {"quant_method": backend, **config} if isinstance(config, dict) else config


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    print(
        "| preset | arch | expert projections quantized | model / fp32 | logit rel. error | save/load identical |"
    )
    print("|---|---|---|---|---|---|")
    for backend, name in PRESETS:
        for arch in MOE_ARCHS:
            model = tiny_moe(arch)
            fp32 = sum(p.numel() * 4 for p in model.parameters())
            ref = logits(model, ids)
            report = quantplug.quantize(model, preset_config(backend, name), progress=False)
            out = logits(model, ids)
            with tempfile.TemporaryDirectory() as folder:
                quantplug.save(model, folder)
                same = torch.equal(logits(quantplug.load(folder, progress=False), ids), out)
            experts = len([c for c in report.converted if ".experts." in c])
            stacked = "" if experts_sites(model) else ", none stacked"
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            print(
                f"| {backend}:{name} | {arch} | {experts} of 48{stacked} | {model_bytes(model) / fp32:.3f} | "
                f"{rel:.4f} | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
