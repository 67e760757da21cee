"""AqlmLinear against aqlm's own reference (``_dequantize_weight`` + ``F.linear`` and aqlm's CPU
forward), and the tensors it keeps: never permuted, saved back byte for byte after it ran."""

import aqlm_ref
import pytest
import torch
from quantplug_aqlm.modules import LUT_MAX_TOKENS, AqlmLinear
from torch import nn

import quantplug

SCHEMES = [
    {"num_codebooks": 1, "nbits_per_codebook": 16, "in_group_size": 8, "out_group_size": 1},
    {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8, "out_group_size": 1},
    {"num_codebooks": 1, "nbits_per_codebook": 8, "in_group_size": 8, "out_group_size": 1},
    {"num_codebooks": 3, "nbits_per_codebook": 8, "in_group_size": 8, "out_group_size": 1},
    {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 4, "out_group_size": 2},
    {"num_codebooks": 2, "nbits_per_codebook": 4, "in_group_size": 4, "out_group_size": 1},
    {"num_codebooks": 1, "nbits_per_codebook": 12, "in_group_size": 8, "out_group_size": 4},
]


def _pair(scheme, in_f=256, out_f=192, bias=True, seed=0):
    """aqlm's layer with random tensors, and an AqlmLinear holding the very same tensors."""
    gen = torch.Generator().manual_seed(seed)
    theirs = aqlm_ref.random_layer(nn.Linear(in_f, out_f, bias=bias), scheme, gen)
    mine = AqlmLinear(in_f, out_f, bias=bias, dtype=torch.float16, **scheme)
    mine.load_state_dict(theirs.state_dict())
    return theirs, mine


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    "scheme",
    SCHEMES,
    ids=lambda s: "{num_codebooks}x{nbits_per_codebook}-{out_group_size}x{in_group_size}".format(**s),
)
@pytest.mark.parametrize("tokens", [1, LUT_MAX_TOKENS, LUT_MAX_TOKENS + 1, 37])
def test_forward_matches_aqlm_dequantize_weight(scheme, tokens):
    theirs, mine = _pair(scheme)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(2))
    ref = aqlm_ref.dequantized_reference(theirs, x)
    with torch.no_grad():
        out = mine(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) < 1e-5
    assert torch.equal(
        mine.dequantize(torch.float32),
        aqlm_ref._dequantize_weight(
            aqlm_ref.unpack_int_data(theirs.codes.data, theirs.nbits_per_codebook),
            theirs.codebooks.float(),
            theirs.scales.float(),
        ),
    )


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=["1x16", "2x8"])
@pytest.mark.parametrize("tokens", [1, 3, 24])
def test_forward_matches_aqlm_cpu_forward(scheme, tokens):
    """aqlm's own QuantizedLinear forward on CPU (numba LUT kernel for 2x8, dequantize_gemm for 1x16)."""
    theirs, mine = _pair(scheme, in_f=128, out_f=256)
    theirs = theirs.float()
    x = torch.randn(2, tokens, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), aqlm_ref.one_numba_thread():  # aqlm's numba kernel races on more threads
        assert _rel(mine(x), theirs(x)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 16])
def test_16_bit_activations(dtype, tokens):
    theirs, mine = _pair(SCHEMES[1])
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = mine(x.to(dtype))
    assert out.dtype == dtype
    assert _rel(out, aqlm_ref.dequantized_reference(theirs, x)) < 2e-2


def test_blocked_dequantize_matches_whole(monkeypatch):
    """The dense path dequantizes a block of rows at a time on big layers: same output as in one go."""
    import quantplug_aqlm.modules as modules

    theirs, mine = _pair(SCHEMES[4], in_f=64, out_f=96)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = mine(x)
        monkeypatch.setattr(modules, "BLOCK_WEIGHTS", 64 * 2 * 5)  # 5 output groups per block: 48 = 9 x 5 + 3
        blocked = mine(x)
    assert torch.allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    assert _rel(whole, aqlm_ref.dequantized_reference(theirs, x)) < 1e-5


def test_stored_tensors_never_change():
    theirs, mine = _pair(SCHEMES[1])
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    with torch.no_grad():
        mine(torch.randn(1, 256))  # look-up table path
        mine(torch.randn(40, 256))  # dequantize path
        mine(torch.randn(2, 256, dtype=torch.bfloat16))
    after = mine.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    # what aqlm's own module does on its first CPU forward with 8-bit codebooks (the trap quantplug avoids)
    theirs = theirs.float()
    codes = theirs.codes.data.clone()
    with torch.no_grad():
        theirs(torch.randn(1, 256))
    assert theirs.codes.shape != codes.shape and torch.equal(theirs.codes.data, codes.permute(1, 0, 2))


def test_save_after_forward_is_byte_identical(tmp_path):
    from safetensors.torch import load_file

    ids, _ = aqlm_ref.write(tmp_path / "ckpt", {"num_codebooks": 2, "nbits_per_codebook": 8}, bias=True)
    model = quantplug.load(tmp_path / "ckpt", progress=False)
    with torch.no_grad():
        model(ids[:1, :1])  # one token: the look-up table
        model(ids)  # 24 tokens: dequantized blocks
    saved = quantplug.save(model, tmp_path / "again")
    theirs = load_file(tmp_path / "ckpt" / "model.safetensors")
    ours = {}
    for f in sorted(saved.glob("*.safetensors")):
        ours.update(load_file(f))
    assert sorted(ours) == sorted(theirs)
    assert [
        k for k in theirs if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])
    ] == []
    assert theirs["model.layers.0.self_attn.q_proj.codebooks"].dtype == torch.float16
