"""Tiny random VPTQ checkpoints made with VPTQ's own code (``vptq_reference.py``): a tiny Llama whose
Linear layers are VPTQ's ``VQuantLinear`` (built as Transformers' ``replace_with_vptq_linear``
builds them), filled with random code books, indices packed by VPTQ's ``pack_index``, random
outliers / permutation / norm; saved as VPTQ's releases are (``config.json`` with the
``quantization_config``, one safetensors file of the model's ``state_dict``), with the logits
VPTQ's forward (its torch path on CPU) computes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import vptq_reference as reference
from safetensors.torch import save_file
from torch import nn

from quantplug.testing import tiny_llama, token_ids

# tiny_llama's Linear layers: name suffix -> (in_features, out_features), hidden 128, kv 64
SHAPES = {
    "self_attn.q_proj": (128, 128),
    "self_attn.k_proj": (128, 64),
    "self_attn.v_proj": (128, 64),
    "self_attn.o_proj": (128, 128),
    "mlp.gate_proj": (128, 256),
    "mlp.up_proj": (128, 256),
    "mlp.down_proj": (256, 128),
}


def entry(
    in_f: int | None,
    out_f: int | None,
    *,
    v: int,
    k: int,
    res: int = -1,
    groups: int = 1,
    outliers: tuple[int, int, int] = (-1, -1, 0),  # (vector length, centroids, columns)
    norm: bool = False,
    perm: bool = False,
    bias: bool | None = False,
) -> dict[str, Any]:
    """A ``config_for_layers`` entry as VPTQ writes it (``VQuantLinear.init_args``); ``in_f`` None:
    a ``shared_layer_config`` entry for layers of 128 inputs (no in/out_features, no bias)."""
    ov, ok, osize = outliers
    width = (in_f or 128) - osize
    assert width % groups == 0
    out = {
        "vector_lens": [ov, v],
        "num_centroids": [ok, k],
        "num_res_centroids": [-1, res],
        "group_num": groups,
        "group_size": width // groups,
        "outlier_size": osize,
        "indices_as_float": False,
        "enable_norm": norm,
        "enable_perm": perm,
        "is_indice_packed": True,
    }
    if in_f is not None:
        out.update(in_features=in_f, out_features=out_f, bias=bias)
    return out


def llama_layers(layers: int = 2, **kw: Any) -> dict[str, dict]:
    """``config_for_layers`` for every Linear of ``tiny_llama`` but the head."""
    return {
        f"model.layers.{i}.{suffix}": entry(i_f, o_f, **kw)
        for i in range(layers)
        for suffix, (i_f, o_f) in SHAPES.items()
    }


def _as_uint16(t: torch.Tensor) -> torch.Tensor:
    """Index values as VPTQ stores them (``init_parameters``: uint16 values viewed as int16)."""
    return t.to(torch.uint16).view(torch.int16)


def vptq_layer(linear: nn.Linear, layer_config: dict, dtype: torch.dtype) -> nn.Module:
    """VPTQ's layer for ``linear``, exactly as Transformers' ``replace_with_vptq_linear`` makes it."""
    p = layer_config
    return reference.load().VQuantLinear(
        linear.in_features,
        linear.out_features,
        vector_lens=p["vector_lens"],
        num_centroids=p["num_centroids"],
        num_res_centroids=p["num_res_centroids"],
        group_num=p["group_num"],
        group_size=p["group_size"],
        outlier_size=p["outlier_size"],
        indices_as_float=p["indices_as_float"],
        enable_norm=p["enable_norm"],
        enable_perm=p["enable_perm"],
        is_indice_packed=True,
        enable_proxy_error=False,
        bias=linear.bias is not None,
        dtype=dtype,
    )


def fill(layer: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random tensors of realistic size in a ``VQuantLinear``; indices packed by VPTQ's ``pack_index``."""
    ref = reference.load()
    dt = layer.centroids.weight.dtype
    g, k, v = layer.num_codebooks, layer.num_centroids, layer.vector_len

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dt)

    layer.centroids.weight.data = randn(g, k * v, std=0.03)
    main = torch.randint(0, k, (g, layer.num_indices, layer.group_size), generator=gen)
    res, res_bits = None, 0
    if layer.enable_residual:
        r = layer.num_res_centroids
        layer.res_centroids.weight.data = randn(g, r * v, std=0.008)
        res = _as_uint16(torch.randint(0, r, main.shape, generator=gen))
        res_bits = int(math.log2(r))
    layer.indices.data = ref.pack_index(
        indice=_as_uint16(main), index_bits=int(math.log2(k)), res_indice=res, res_bits=res_bits
    )
    if layer.enable_outlier:
        ok, ov = layer.num_outlier_centroids, layer.outlier_vector_len
        layer.outlier_centroids.weight.data = randn(1, ok * ov, std=0.08)
        shape = (1, layer.ouliter_num_indices, layer.outlier_size)
        layer.outlier_indices.data = _as_uint16(torch.randint(0, ok, shape, generator=gen))
    if layer.enable_perm:
        layer.perm.data = _as_uint16(torch.randperm(layer.in_features, generator=gen))
    if layer.enable_norm:
        layer.weight_scale.data = 1 + randn(layer.in_features, std=0.1)
        layer.weight_bias.data = randn(layer.in_features, std=0.005)
    if layer.bias is not None:
        layer.bias.data = randn(layer.out_features, std=0.02)
    return layer.requires_grad_(False)


def layer_config_for(name: str, qconfig: dict) -> dict:
    """The entry VPTQ's loaders use: the layer's own, else Transformers' shared key (its second
    dotted component)."""
    return qconfig["config_for_layers"].get(name) or qconfig["shared_layer_config"][name.rsplit(".")[1]]


def write(
    folder: Path, qconfig: dict, dtype: torch.dtype, seed: int = 0, **model_kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny Llama checkpoint in VPTQ's layout in ``folder``; returns (ids, VPTQ's logits)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as a load in dtype builds it: rotary inv_freq stays float32
    try:
        model = tiny_llama(seed=seed, **model_kw)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            layer = fill(vptq_layer(module, layer_config_for(name, qconfig), dtype), gen)
            model.set_submodule(name, layer)
    ids = token_ids()
    with torch.no_grad():
        logits = model(ids).logits
    state = {k: t.contiguous() for k, t in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = copy.deepcopy({"quant_method": "vptq", **qconfig})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return ids, logits
