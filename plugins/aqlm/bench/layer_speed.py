"""ms per forward of one AQLM layer on CPU: quantplug-aqlm's AqlmLinear (look-up table and
dequantize paths) against aqlm 1.1.7's own QuantizedLinear CPU forward (numba kernel for Kx8,
dequantize_gemm otherwise) and the dense float32 layer, float32 activations.

    python bench/layer_speed.py [--size 2048] [--tokens 1 4 8 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import quantplug_aqlm.modules as modules
import torch
import torch.nn.functional as F
from aqlm.utils import _dequantize_weight, unpack_int_data
from quantplug_aqlm.modules import AqlmLinear
from torch import nn

SCHEMES = {
    "1x16": {"num_codebooks": 1, "nbits_per_codebook": 16, "in_group_size": 8, "out_group_size": 1},
    "2x8": {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8, "out_group_size": 1},
}


def _ms(fn, x, repeats: int) -> float:
    with torch.no_grad():
        fn(x)
        fn(x)  # warm up (aqlm: numba compiles on the first call)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return 1000 * min(times)  # best of: the figure least disturbed by other processes


def _layers(scheme: dict, size: int):
    from aqlm import QuantizedLinear

    gen = torch.Generator().manual_seed(0)
    theirs = QuantizedLinear(size, size, bias=False, dtype=torch.float32, **scheme)
    with torch.no_grad():
        nbits = scheme["nbits_per_codebook"]
        codes = torch.randint(0, 2**nbits, tuple(theirs.codes.shape), generator=gen)
        theirs.codes.data = (codes - (codes >= 2 ** (nbits - 1)) * 2**nbits).to(theirs.codes.dtype)
        # values float16 holds exactly: mine stores them in float16, as checkpoints do
        theirs.codebooks.copy_((torch.randn(tuple(theirs.codebooks.shape), generator=gen) * 0.01).half())
        theirs.scales.copy_((torch.rand(tuple(theirs.scales.shape), generator=gen) + 0.5).half())
    mine = AqlmLinear(
        size, size, bias=False, dtype=torch.float16, **scheme
    )  # float16 as checkpoints store it
    mine.load_state_dict(theirs.state_dict())
    return theirs, mine


def _forced(mine: AqlmLinear, lut: bool):
    def run(x):
        return mine._lut_matmul(x) if lut else mine._dequant_matmul(x)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 256])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"Linear({args.size}, {args.size}), float32 activations, best of {args.repeats}; ms per forward\n")
    print(f"numba {numba.__version__}, {numba.get_num_threads()} numba threads\n")
    print(
        "| scheme | tokens | dense fp32 | aqlm 1.1.7 forward | aqlm, 1 numba thread | quantplug auto "
        "| quantplug LUT | quantplug dequantize |"
    )
    print("|---|---|---|---|---|---|---|---|")
    dense = nn.Linear(args.size, args.size, bias=False)
    for label, scheme in SCHEMES.items():
        theirs, mine = _layers(scheme, args.size)
        theirs_codes, bits = theirs.codes.data.clone(), scheme["nbits_per_codebook"]
        for tokens in args.tokens:
            x = torch.randn(tokens, args.size)
            with torch.no_grad():
                ref = F.linear(
                    x,
                    _dequantize_weight(unpack_int_data(theirs_codes, bits), theirs.codebooks, theirs.scales),
                )
                assert float((mine(x) - ref).norm() / ref.norm()) < 1e-4
            row = [_ms(dense, x, args.repeats), _ms(theirs, x, args.repeats)]
            if mine.codebook_size <= 256:  # the numba kernel: exact on one thread only (a data race)
                numba.set_num_threads(1)
                row.append(_ms(theirs, x, args.repeats))
                numba.set_num_threads(args.threads or numba.config.NUMBA_NUM_THREADS)
            else:
                row.append(None)
            row.append(_ms(mine, x, args.repeats))
            lut = (
                _ms(_forced(mine, True), x, args.repeats)
                if tokens <= 16 and mine.codebook_size <= modules.LUT_MAX_CODEBOOK
                else None
            )
            row += [lut, _ms(_forced(mine, False), x, args.repeats)]
            cells = " | ".join("—" if v is None else f"{v:.2f}" for v in row)
            print(f"| {label} | {tokens} | {cells} |")


if __name__ == "__main__":
    main()
