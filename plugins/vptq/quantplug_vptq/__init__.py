"""quantplug-vptq: VPTQ checkpoints (``quant_method: "vptq"``, VPTQ-community) loaded in plain PyTorch.

Load-only. A loaded layer keeps the checkpoint's tensors as stored (code books, bit-packed int32
indices, outliers, permutation, norm) and rebuilds its weight on every forward the way VPTQ's own
pure-torch reference does (``vptq.ops.quant_gemm.dequant``), then calls ``F.linear``. Quantizing
is refused: VPTQ quantizes with Hessians calibrated on GPUs in the authors' repository, which the
``vptq`` package does not ship. The ``vptq`` library is not needed (its wheel links CUDA and pulls
datasets, gradio, sentence-transformers...). Importing this module imports no torch.
"""

import quantplug

from .config import VptqConfig

__all__ = ["VptqConfig", "register_backends"]


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="vptq",
            config=VptqConfig,
            quantizer="quantplug_vptq.quantizer:VptqQuantizer",
            capabilities=quantplug.Capabilities(
                # VPTQ-community's releases: about 2, 3 and 4 stored bits per weight
                # (e.g. v8-k65536: 16-bit index per 8 weights; v12-k65536-4096: 28 per 12)
                bits=(2, 3, 4),
                # plain torch ops (gather, integer shifts, argsort, F.linear); tested on CPU
                devices=("cpu", "cuda"),
                needs_calibration=False,
                trainable=False,
                serializable=True,
                quantizes=False,
                weight_dtypes=("vq-codebook",),
            ),
            requires=(),  # plain PyTorch: the vptq library is not used
            description="VPTQ vector-quantized checkpoints (code books + packed indices), load-only, "
            "dequantized per layer on every forward in plain PyTorch",
            notes="load-only: VPTQ quantizes with GPU-calibrated Hessians in the authors' repository; "
            "on CPU each layer's weight is rebuilt on every forward (slow at decode)",
            transformers_format=True,
        )
    )
