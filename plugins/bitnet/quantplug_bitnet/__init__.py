"""quantplug-bitnet: BitNet b1.58 (Transformers' ``quant_method: "bitnet"``) in Transformers' exact
checkpoint layout, run on integer matmuls.

Both of Transformers' linear classes load and save: ``bitlinear`` (``weight_scale`` = 1 / mean|W|)
and ``autobitlinear`` (``weight_scale`` = mean|W|; microsoft/bitnet-b1.58-2B-4T), offline (packed
ternary codes, 4 rows per byte) or online (full-precision weights ternarized on every forward, for
quantization-aware training). An offline layer rounds its activations to int8 per token, as
Transformers does, and multiplies them with its int8 codes in ``torch._int_mm`` (exact integer sums)
in a bfloat16 / float16 model on a CPU, else on the kernel quantplug has for them
(``quantplug.choose_kernel``); Transformers' own CPU path unpacks every weight into floats on every
forward.

Quantizing an ordinary model to ternary weights destroys it (measured in bench/RESULTS.md 'BitNet'):
only models trained for it (BitNet b1.58) keep their accuracy, so ``select`` proposes this method
for ``bitnet`` models only. Importing this module imports no torch.
"""

import quantplug

from .config import BitNetConfig

__all__ = ["PRESETS", "BitNetConfig", "register_backends"]

# bits_per_weight and rel_error: the kit's preset layer, Linear(2048, 2048) with N(0, 0.02) weights
# in bfloat16 (quantplug.preset_check) -- Gaussian weights are what BitNet models are not trained for
PRESETS = (
    quantplug.Preset(
        "ternary",
        {"linear_class": "autobitlinear", "quantization_mode": "offline"},
        bits=2,
        bits_per_weight=2.0,
        rel_error=0.513,
        dtype="bfloat16",
        model_types=("bitnet",),
        note="BitNet b1.58 models only (trained for ternary weights): weights -1 / 0 / +1 times one scale per "
        "layer, int8 activations per token, as microsoft/bitnet-b1.58-2B-4T stores them; an ordinary model "
        "does not survive it",
    ),
)


@quantplug.hookimpl
def register_backends(register):
    register(
        quantplug.Backend(
            name="bitnet",
            config=BitNetConfig,
            quantizer="quantplug_bitnet.quantizer:BitNetQuantizer",
            capabilities=quantplug.Capabilities(
                bits=(2,),
                devices=("cpu", "cuda", "mps"),
                needs_calibration=False,
                trainable=False,
                serializable=True,
                weight_dtypes=("ternary",),
                activation_dtypes=("int8",),
                max_rel_error={2: 0.55},
            ),
            requires=(),  # plain PyTorch
            presets=PRESETS,
            description="BitNet b1.58: ternary weights (packed 4 per byte) with int8 activations, Transformers' "
            "BitLinear / AutoBitLinear layouts; for BitNet-trained models; integer matmuls on CPU",
            transformers_format=True,
        )
    )
