"""quantplug-gpu-formats: the methods whose libraries run only on CUDA, under Transformers' names.

- ``eetq``: EETQ's int8 weight-only math (symmetric, one scale per output channel, the rounding and
  clamp of EETQ's ``symmetric_quantize``) in plain PyTorch, on any device: ``quantize`` and
  quantize-on-load (``load(folder, config={"quant_method": "eetq"})``); on a CPU its layers run the
  core's ``torch-int8-cpu`` kernel in a bfloat16 / float16 model. Saving is refused, and so is reading
  an EETQ checkpoint: EETQ stores FasterTransformer's interleaved int8 layout for the SM of the GPU
  that quantized it, which nothing here can verify.
- ``spqr`` and ``higgs``: refused on every device with what they need (a CUDA GPU, the library,
  the Transformers call) and what to do. spqr-quant decodes on CUDA only (even its host-side
  dequantize reference is compiled into its CUDA extension); HIGGS needs FLUTE and
  fast-hadamard-transform, and its layout depends on the GPU's SM count. No reader is guessed.

This module is what the ``quantplug`` entry point names; it imports no torch.
"""

import quantplug

from .config import EetqConfig, HiggsConfig, SpQRConfig

__all__ = ["PRESETS", "EetqConfig", "HiggsConfig", "SpQRConfig", "register_backends"]

# bits_per_weight / rel_error: the kit's preset layer, Linear(2048, 2048) with N(0, 0.02) weights in
# bfloat16 (quantplug.testing.measure_preset): int8 codes + one bfloat16 scale per row, 8 + 16 / 2048;
# rel_error 0.0087 measured there on the torch-int8-cpu kernel.
# No speed is declared: not measured (the layers run the same torch-int8-cpu kernel as rtn's int8).
PRESETS = (
    quantplug.Preset(
        "int8",
        {"weights": "int8"},
        bits=8,
        bits_per_weight=8.008,
        rel_error=0.0087,
        dtype="bfloat16",
        note="EETQ's int8 per-channel math on the core's int8 kernels; not saveable",
    ),
)

_GPU_ROUTE = "load it with Transformers on a CUDA GPU (bench/gpu_checks.py has the calls)"


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="eetq",
            # the config is Transformers' EetqConfig and no checkpoint is written in another layout:
            # Transformers' own EETQ path keeps every from_pretrained of an eetq checkpoint
            transformers_format=True,
            config=EetqConfig,
            quantizer="quantplug_gpu_formats.eetq:EetqQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(8,),
                devices=("cpu", "cuda"),
                serializable=False,  # EETQ's layout is SM-specific and unverified here
                weight_dtypes=("int8",),
                max_rel_error={8: 0.02},
            ),
            presets=PRESETS,
            description="EETQ's int8 weight-only math (per output channel, max/128) in plain PyTorch: "
            "quantize and quantize-on-load; the core's torch-int8-cpu kernel runs it in bfloat16 / float16.",
            notes="save is refused and EETQ checkpoints are not read: EETQ stores FasterTransformer's "
            "interleaved int8 layout for the quantizing GPU's SM (preprocess_weights_for_mixed_gemm), which "
            f"nothing on a CPU can verify; {_GPU_ROUTE}, or quantize the full-precision model on load.",
        )
    )
    register(
        quantplug.Backend(
            name="spqr",
            transformers_format=True,  # Transformers' own SpQR path keeps from_pretrained
            config=SpQRConfig,
            quantizer="quantplug_gpu_formats.cuda_only:SpqrQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(3,),
                devices=(),  # quantplug runs SpQR on no device: see notes
                quantizes=False,
                serializable=False,
                weight_dtypes=("uint3",),
            ),
            description="names SpQR checkpoints and refuses them with the route: a CUDA GPU, spqr-quant "
            "and Transformers.",
            notes=f"CUDA only, refused on every device: spqr-quant compiles its CUDA kernels on first use; {_GPU_ROUTE}.",
        )
    )
    register(
        quantplug.Backend(
            name="higgs",
            transformers_format=True,  # Transformers' own HIGGS path keeps from_pretrained
            config=HiggsConfig,
            quantizer="quantplug_gpu_formats.cuda_only:HiggsQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(2, 3, 4),
                devices=(),  # quantplug runs HIGGS on no device: see notes
                quantizes=False,
                serializable=False,
                weight_dtypes=("int2", "int3", "int4"),
            ),
            description="names HIGGS checkpoints and refuses them with the route: a CUDA GPU, FLUTE, "
            "fast-hadamard-transform and Transformers.",
            notes=f"CUDA only, refused on every device: FLUTE's layout depends on the GPU's SM count; {_GPU_ROUTE}.",
        )
    )
