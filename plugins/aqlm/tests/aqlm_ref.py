"""Tiny AQLM checkpoints written with aqlm's own module (``aqlm.QuantizedLinear``, aqlm 1.1.7), and
the logits aqlm computes for them on CPU: the oracle of the tests.

Each decoder Linear of a random-weight Llama becomes an ``aqlm.QuantizedLinear`` whose codes,
codebooks (float16, as published checkpoints store them) and scales are random in aqlm's own
layout (codes packed signed with ``aqlm.utils.pack_int_data``); the checkpoint is written BEFORE
aqlm runs (its CPU forward permutes ``codes`` in place with 8-bit codebooks) and the oracle runs a
float32 copy (aqlm's numba kernel takes float32 only).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from aqlm import QuantizedLinear
from aqlm.utils import _dequantize_weight, pack_int_data, unpack_int_data
from safetensors.torch import save_file
from torch import nn

from quantplug.testing import tiny_llama, token_ids

DEFAULT_SKIPS = ("model.embed_tokens.weight", "lm_head.weight")


@contextlib.contextmanager
def one_numba_thread():
    """aqlm 1.1.7's numba kernel (Kx8 codebooks on CPU) adds into ``output_vec[i]`` from a ``prange``
    over input groups: a data race that gives wrong outputs (10-36% relative error per row, measured
    on 2 threads) whenever numba runs it on more than one thread. On one thread it is exact."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def aqlm_forward_is_right(config: dict) -> bool:
    """Whether aqlm 1.1.7's own CPU forward computes this scheme: with 8-bit codebooks it permutes
    ``codes`` for its numba kernel, which it only uses for out_group_size 1; with out_group_size > 1
    the permuted codes go to ``dequantize_gemm``, which reads them unpermuted (wrong output)."""
    return not (config.get("nbits_per_codebook", 16) == 8 and config.get("out_group_size", 1) > 1)


def random_layer(linear: nn.Linear, config: dict, gen: torch.Generator) -> QuantizedLinear:
    """An aqlm layer for ``linear``'s shape with random codes, codebooks and scales (float16), whose
    weight has about the std 0.02 of a random Transformers layer."""
    igs, ogs = config.get("in_group_size", 8), config.get("out_group_size", 1)
    k, nbits = config.get("num_codebooks", 1), config.get("nbits_per_codebook", 16)
    layer = QuantizedLinear(
        linear.in_features,
        linear.out_features,
        in_group_size=igs,
        out_group_size=ogs,
        num_codebooks=k,
        nbits_per_codebook=nbits,
        bias=linear.bias is not None,
        dtype=torch.float16,
    )
    with torch.no_grad():
        codes = torch.randint(0, 2**nbits, tuple(layer.codes.shape), generator=gen)
        layer.codes.data = pack_int_data(codes, nbits)
        layer.codebooks.copy_(torch.randn(tuple(layer.codebooks.shape), generator=gen) * (0.02 / k**0.5))
        layer.scales.copy_(torch.rand(tuple(layer.scales.shape), generator=gen) + 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(tuple(layer.bias.shape), generator=gen) * 0.02)
    return layer


def dequantized_reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """aqlm's reference weight (``_dequantize_weight(unpack_int_data(codes))``) times ``x``, float32."""
    weight = _dequantize_weight(
        unpack_int_data(layer.codes.data, layer.nbits_per_codebook),
        layer.codebooks.float(),
        layer.scales.float(),
    )
    return F.linear(x.float(), weight, None if layer.bias is None else layer.bias.float())


class _DequantizedAqlm(nn.Module):
    """aqlm's layer computed through ``_dequantize_weight`` + ``F.linear`` (aqlm's own functions),
    for the scheme its CPU forward gets wrong."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return dequantized_reference(self.layer, x).to(x.dtype)


def build(config: dict, dense: tuple[str, ...] = (), seed: int = 0, bias: bool = False, dtype=torch.float32):
    """A tiny Llama whose decoder Linears are aqlm layers (those named in ``dense`` stay dense;
    ``bias``: attention projections get biases). Returns (model, {name: aqlm layer})."""
    model = tiny_llama(seed, attention_bias=bias).to(dtype)  # the aqlm layers stay float16
    gen = torch.Generator().manual_seed(seed + 1)
    layers = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("model.layers.") and name not in dense:
            layers[name] = random_layer(module, config, gen)
            model.set_submodule(name, layers[name])
    return model, layers


def write(
    folder: Path,
    config: dict,
    dense: tuple[str, ...] = (),
    seed: int = 0,
    bias: bool = False,
    skips=None,
    dtype: torch.dtype = torch.float32,
):
    """Write the checkpoint (config.json, model.safetensors; a ``dtype`` model, float16 codebooks)
    and return (ids, the logits aqlm's modules compute for them on CPU, in float32)."""
    model, layers = build(config, dense, seed, bias, dtype)
    skips = list(DEFAULT_SKIPS if skips is None else skips) + [f"{n}.weight" for n in dense]
    qc = {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 1}
    qc.update({"nbits_per_codebook": 16, **config, "linear_weights_not_to_quantize": skips})
    cfg = model.config.to_dict()
    cfg.update(
        quantization_config=qc, dtype=str(dtype).removeprefix("torch."), architectures=["LlamaForCausalLM"]
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ids = token_ids(model.config.vocab_size, (2, 12))
    return ids, reference_logits(model, layers, config, ids)


def reference_logits(model: nn.Module, layers: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """aqlm's logits on CPU in float32, computed on a copy (aqlm's forward rewrites codes in place)."""
    oracle = copy.deepcopy(model).float()
    if not aqlm_forward_is_right(config):
        for name in layers:
            oracle.set_submodule(name, _DequantizedAqlm(oracle.get_submodule(name)))
    with torch.no_grad(), one_numba_thread():
        return oracle(ids).logits
