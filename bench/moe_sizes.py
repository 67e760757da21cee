"""Issue 29's goal table: each of five backends' 8-bit preset on tiny Mixtral, Qwen3-MoE and gpt-oss
(``quantplug.testing_models.tiny_moe``): expert projections quantized, model bytes over fp32,
relative logit error, and whether save -> load gives identical logits. Prints a Markdown table.

    python bench/moe_sizes.py      # the integration env (all five plugins installed), ~1 min
"""

import logging
import tempfile
import warnings

import torch

import quantplug

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from quantplug.experts import experts_sites
from quantplug.footprint import model_bytes
from quantplug.testing_models import tiny_moe


def preset(backend, name):
    p = next(p for p in quantplug.get_backend(backend).presets if p.name == name)
    c = p.config
    return c if not isinstance(c, dict) else {"quant_method": backend, **c}


cfgs = {
    "rtn:int8": preset("rtn", "int8"),
    "bitsandbytes:int8": preset("bitsandbytes", "int8"),
    "hqq:8bit-g64": preset("hqq", "8bit-g64"),
    "quanto:int8": preset("quanto", "int8"),
    "torchao:int8-weight-only": preset("torchao", "int8-weight-only"),
}
ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
print(
    "| preset | arch | expert projections quantized | model / fp32 | logit rel. error | save/load identical |"
)
print("|---|---|---|---|---|---|")
for label, cfg in cfgs.items():
    for arch in ["mixtral", "qwen3_moe", "gpt_oss"]:
        m = tiny_moe(arch)
        fp = sum(p.numel() * 4 for p in m.parameters())
        with torch.no_grad():
            ref = m(ids).logits
        r = quantplug.quantize(m, cfg, progress=False)
        with torch.no_grad():
            out = m(ids).logits
        d = tempfile.mkdtemp()
        quantplug.save(m, d)
        with torch.no_grad():
            again = quantplug.load(d, progress=False)(ids).logits
        n = len([c for c in r.converted if ".experts." in c])
        print(
            f"| {label} | {arch} | {n} of 48{', none stacked' if not experts_sites(m) else ''} | {model_bytes(m) / fp:.3f} | {((out.float() - ref).norm() / ref.norm()).item():.4f} | {torch.equal(again, out)} |",
            flush=True,
        )
