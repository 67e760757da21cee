"""One VPTQ layer's forward on this machine: quantplug-vptq's (dequantize, then F.linear) against
the dense layer, and against VPTQ's own torch path when its files are found (tests/vptq_reference.py:
QUANTPLUG_VPTQ_REFERENCE=DIR holding vptq 0.0.5.post1's files).

    python bench/layer.py [--size 2048] [--dtype float32]

Random tensors: any packed bits are valid indices (code book sizes are powers of two)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from quantplug_vptq.config import spec_of
from quantplug_vptq.layer import VptqLinear

SETTINGS = {  # VPTQ-community's common shapes of settings
    "v8-k65536 (2 bits)": dict(vector_lens=[-1, 8], num_centroids=[-1, 65536], num_res_centroids=[-1, -1]),
    "v8-k65536-256 (3 bits)": dict(
        vector_lens=[-1, 8], num_centroids=[-1, 65536], num_res_centroids=[-1, 256]
    ),
    "v6-k4096 (2 bits)": dict(vector_lens=[-1, 6], num_centroids=[-1, 4096], num_res_centroids=[-1, -1]),
}


def layer(n: int, settings: dict, dtype: torch.dtype) -> VptqLinear:
    entry = dict(settings, group_num=1, group_size=n, outlier_size=0, enable_norm=True, enable_perm=True)
    q = VptqLinear(n, n, spec_of(entry), bias=False, dtype=dtype, device="cpu")
    g = torch.Generator().manual_seed(0)
    q.centroids.weight.data = (torch.randn(q.centroids.weight.shape, generator=g) * 0.02).to(dtype)
    if q.res_centroids is not None:
        q.res_centroids.weight.data = (torch.randn(q.res_centroids.weight.shape, generator=g) * 0.005).to(
            dtype
        )
    q.indices.data = torch.randint(-(2**31), 2**31, q.indices.shape, generator=g, dtype=torch.int64).to(
        torch.int32
    )
    q.perm.data = torch.randperm(n, generator=g).to(torch.int16)
    q.weight_scale.data = torch.ones(n, dtype=dtype)
    q.weight_bias.data = torch.zeros(n, dtype=dtype)
    return q


def ms(fn, reps: int) -> float:
    """The fastest of ``reps`` calls, in ms (robust to other processes on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def vptq_torch_path(q: VptqLinear):
    """VPTQ's own quant_gemm (its torch dequant on a machine without CUDA), or None."""
    if not os.environ.get("QUANTPLUG_VPTQ_REFERENCE"):
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import vptq_reference as reference

    ref, s = reference.load(), q.spec
    return lambda x: ref.quant_gemm(
        x, None, q.indices, q.centroids.weight, None, None, None,
        None if q.res_centroids is None else q.res_centroids.weight,
        q.perm, q.weight_scale, q.weight_bias, s.vector_len, -1, 1, s.num_centroids, -1,
        s.num_res_centroids or -1, True, s.group_size, 0, q.in_features, q.out_features, (-q.out_features) % s.vector_len, 0,
    )  # fmt: skip


def timings(q: VptqLinear, theirs, dense: torch.Tensor, x: torch.Tensor) -> str:
    reps = 20 if x.shape[0] == 1 else 5
    row = f"dequant {ms(q.dequantize, reps):7.2f} ms, forward {ms(lambda: q(x), reps):7.2f} ms, "
    row += f"dense {ms(lambda: F.linear(x, dense), reps):6.2f} ms"
    if theirs is not None:
        row += f", VPTQ torch path {ms(lambda: theirs(x), max(2, reps // 4)):7.2f} ms"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    dtype, n = getattr(torch, args.dtype), args.size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, Linear({n}, {n}), {args.dtype}")
    dense = torch.randn(n, n, dtype=dtype) * 0.02
    for label, settings in SETTINGS.items():
        q = layer(n, settings, dtype)
        stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
        theirs = vptq_torch_path(q)
        with torch.no_grad():
            if theirs is not None:
                x = torch.randn(4, n, dtype=dtype)
                assert torch.equal(theirs(x), q(x)), "quantplug's output differs from VPTQ's torch path"
            for tokens in (1, 256):
                print(
                    f"{label:24s} {tokens:4d} tok: "
                    + timings(q, theirs, dense, torch.randn(tokens, n, dtype=dtype))
                )
        print(
            f"{'':24s} stored {stored / 2**20:.2f} MiB vs dense {n * n * dense.element_size() / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
