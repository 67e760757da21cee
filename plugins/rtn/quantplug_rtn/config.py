"""``RtnConfig``: round-to-nearest settings. Light: imports no torch."""

from __future__ import annotations

import dataclasses
from typing import Literal

import quantplug


@dataclasses.dataclass(frozen=True)
class RtnConfig(quantplug.QuantConfig):
    """Round-to-nearest weight quantization.

    bits        2, 4 or 8 bits per weight (packed: 4, 2 or 1 values per byte)
    group_size  weights sharing one scale along the input dimension; -1 = one group per output channel
    symmetric   True: scale only (codes centred on zero); False: scale and zero point per group
    kernel      which matmul runs the layers after quantize / load (``quantize(..., kernel=)`` and
                ``load(..., kernel=)`` override it): the core's kernels (``quantplug.kernels``; torch's
                fused weight-only CPU kernels ``torch-int8-cpu`` and ``torch-int4-cpu``) run the
                symmetric int8 per-channel and int4 layers (groups of a multiple of 32) of a bfloat16 / float16
                model on a CPU, as ``quantplug.KernelLinear``; the others run ``RtnLinear``, which
                dequantizes on every forward. "auto": so; "fused": the same, but a layer that no kernel
                runs is an error; "portable": always ``RtnLinear``. Checkpoints are the same either way.
    dense_from  kernel layers given this many rows (batch x tokens) or more dequantize and run the
                dense matmul, which is faster than the kernels there (prefill); fewer rows (decode)
                run the kernel. None: the kernel's own crossover, measured on a 2-core Xeon (AVX-512
                BF16) with SmolLM2's layer shapes (bench/results/fused_cpu.json): 32 rows for int8,
                96 for int4
    """

    quant_method = "rtn"

    bits: Literal[2, 4, 8] = 4
    group_size: int = 128
    symmetric: bool = True
    kernel: Literal["auto", "fused", "portable"] = "auto"
    dense_from: int | None = None

    def validate(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise self.invalid("group_size", "-1 (one group per output channel) or a positive integer")
        if self.dense_from is not None and self.dense_from < 1:
            raise self.invalid("dense_from", "a positive integer (rows from which the dense matmul runs)")
        if self.kernel == "fused":
            problem = layout_problem(self.bits, self.group_size, self.symmetric)
            if problem is not None:
                raise self.invalid("kernel", "'auto' or 'portable'", why=problem)


INT4_GROUP = 32
"""torch's fused int4 CPU kernel (``torch-int4-cpu``) takes groups of a multiple of this many inputs."""


def layout_problem(bits: int, group_size: int, symmetric: bool) -> str | None:
    """Why layers of these settings cannot run a fused kernel (None: they may; a layer's shape can
    still rule it out): ``kernel="fused"`` with such settings is a config error, before any model
    is seen."""
    if not symmetric:
        return (
            "asymmetric layers run no fused kernel: their zero is each group's minimum, a float the "
            "kernels' grids cannot give back bit for bit (symmetric=true runs them)"
        )
    if (bits == 8 and group_size == -1) or (bits == 4 and (group_size == -1 or group_size % INT4_GROUP == 0)):
        return None
    return (
        f"bits={bits}, group_size={group_size} has no fused kernel: int8 needs group_size=-1 (per "
        f"channel), int4 a group_size that is a multiple of {INT4_GROUP} (32, 64, 128, 256, ...) or -1"
    )
