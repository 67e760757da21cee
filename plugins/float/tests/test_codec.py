"""quantplug_float.codec: the e4m3 bit trick, the bfloat16 fast path and ragged tiles."""

from __future__ import annotations

import pytest
import torch
from quantplug_float import codec


def test_every_e4m3_code_reads_exactly_through_the_bit_trick():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~codes.float().isnan()
    got = codec._e4m3_as_bf16_shifted(codes).float() * 2.0**120
    assert torch.equal(got[finite], codes.float()[finite])  # subnormals and both zeros included


@pytest.mark.parametrize("exact_scales", [True, False])
def test_bf16_dequantize_is_transformers_fp32_product_rounded_once(exact_scales):
    torch.manual_seed(0)
    w = torch.randn(256, 384) * 0.02
    q, s = codec.quantize_blocks(w, (128, 128))
    if not exact_scales:  # DeepSeek-V3-style float32 scales: not bfloat16 values, the exact path
        s = s * (1 + torch.rand_like(s) * 1e-3)
    product = (q.float().reshape(2, 128, 3, 128) * s[:, None, :, None]).reshape(256, 384)  # Fp8Dequantize's
    assert torch.equal(codec.dequantize(q, s, (128, 128), torch.float32), product)
    assert torch.equal(codec.dequantize(q, s, (128, 128), torch.bfloat16), product.to(torch.bfloat16))


def test_ragged_tiles_get_their_own_scale():
    torch.manual_seed(0)
    w = torch.randn(100, 200)
    w[:, 128:] *= 100  # the second column of tiles is 100x larger: its own scale
    q, s = codec.quantize_blocks(w, (128, 128))
    assert q.shape == (100, 200) and s.shape == (1, 2)
    assert s[0, 1] > 50 * s[0, 0]
    back = codec.dequantize(q, s, (128, 128), torch.float32)
    assert ((back - w).norm() / w.norm()).item() < 0.04
    assert (w.abs().amax() / s.amax()).item() <= codec.E4M3_MAX  # no tile is clipped


def test_ue8m0_scales_are_powers_of_two_and_bytes_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    q, s = codec.quantize_blocks(w, (1, 32), pow2=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    stored = codec.e8m0_bytes(s)
    assert stored.dtype == torch.uint8 and torch.equal(codec.scales_as_float(stored), s)
    back = codec.dequantize(q, stored, (1, 32), torch.bfloat16)
    assert ((back.float() - w).norm() / w.norm()).item() < 0.04
