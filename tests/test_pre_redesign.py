"""Checkpoints written by quantplug 0.1.0 before the core redesign (issue 14) still load, unchanged.

``fixtures/pre_redesign/<backend>-<preset>/`` was written by ``fixtures/make_pre_redesign.py`` on
main at d51a435: one tiny Llama per CPU preset of every first-party backend, with the token ids and
logits of the model that was saved. Each is loaded with today's code and must compute the same
logits. Backends not installed in this environment are skipped (the integration env has them all).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import quantplug

FIXTURES = Path(__file__).parent / "fixtures" / "pre_redesign"
FOLDERS = sorted(p for p in FIXTURES.iterdir() if p.is_dir())


def test_every_first_party_backend_has_fixtures():
    methods = {
        json.loads((f / "config.json").read_text())["quantization_config"]["quant_method"] for f in FOLDERS
    }
    assert methods == {"rtn", "bitsandbytes", "hqq", "quanto", "torchao"}


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_pre_redesign_checkpoint_loads_with_the_same_logits(folder: Path):
    import torch
    from safetensors.torch import load_file

    method = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
    if method not in {b.name for b in quantplug.backends() if b.available}:
        pytest.skip(f"backend {method!r} is not installed here")
    expected = load_file(str(folder / "expected.safetensors"))
    model = quantplug.load(folder, progress=False)
    assert model.quantplug_info.config.quant_method == method
    with torch.no_grad():
        got = model(expected["ids"]).logits
    torch.testing.assert_close(got, expected["logits"], rtol=1e-4, atol=1e-4)
