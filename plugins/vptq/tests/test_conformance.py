"""The load-only conformance kit on tiny VPTQ checkpoints made with VPTQ's own code, and held to
the logits VPTQ's own forward computes for them (its torch path, on CPU)."""

from __future__ import annotations

import json

import torch
import vptq_checkpoints as checkpoints
from vptq_checkpoints import entry, llama_layers

from quantplug.testing import LoadOnlyConformance


def _case(config_for_layers: dict, shared: dict | None = None) -> dict:
    return {
        "config_for_layers": config_for_layers,
        "shared_layer_config": shared or {},
        "enable_proxy_error": False,
    }


# (quantization_config, model dtype, tiny_llama overrides)
CASES = [
    # plain: one code book per half of the inputs, no residual, outliers, norm or perm; v=6 pads
    # every layer's rows (64, 128, 256 outputs)
    (_case(llama_layers(v=6, k=64, groups=2)), torch.float32, {}),
    # everything: residual code books (8 + 4 index bits, packed across int32 words), 8 outlier
    # columns (v=3, padded), permutation, norm, biases (attention_bias), v=12 pads the rows
    (
        _case(
            llama_layers(v=12, k=256, res=16, groups=2, outliers=(3, 32, 8), norm=True, perm=True, bias=None)
        ),
        torch.float32,
        {"attention_bias": True},
    ),
    # VPTQ-community's shape of settings in float16 (v8, 65536 + 256 centroids: index values past
    # 32767 in uint16-as-int16, 24-bit entries), every layer from shared_layer_config by the key
    # Transformers looks up (the name's second component: "layers")
    (
        _case({}, {"layers": entry(None, None, v=8, k=65536, res=256, norm=True, perm=True)}),
        torch.float16,
        {"intermediate_size": 128},
    ),
]


def _bias_flags(config: dict, model_kw: dict) -> dict:
    """Entries built with ``bias=None`` get the layer's own flag."""
    for name, e in config["config_for_layers"].items():
        if e.get("bias", False) is None:
            e["bias"] = bool(model_kw.get("attention_bias")) and ".self_attn." in name
    return config


for _config, _, _kw in CASES:
    _bias_flags(_config, _kw)


class TestVptqConformance(LoadOnlyConformance):
    backend_name = "vptq"
    configs = [c for c, _, _ in CASES]
    bad_configs = [
        ({"enable_proxy_error": True}, "enable_proxy_error"),
        (
            {"config_for_layers": {"model.layers.0.mlp.up_proj": {"vector_lens": [-1, 8]}}},
            "config_for_layers",
        ),
        ({"config_for_layers": {"x": entry(128, 128, v=8, k=100)}}, "config_for_layers"),
        (
            {"config_for_layers": {"x": {**entry(128, 128, v=8, k=256), "is_indice_packed": False}}},
            "config_for_layers",
        ),
        (
            {"config_for_layers": {"x": {**entry(128, 128, v=8, k=256), "vector_quant_dim": "in"}}},
            "config_for_layers",
        ),
        ({"config_for_layers": {"x": {**entry(128, 128, v=8, k=256), "group_size": 0}}}, "config_for_layers"),
        ({"config_for_layers": {"x": entry(128, 128, v=8, k=65536, res=65536 * 2)}}, "config_for_layers"),
        (
            {"shared_layer_config": {"layers": {**entry(None, None, v=8, k=256), "typo": 1}}},
            "shared_layer_config",
        ),
        ({"config_for_layers": []}, "config_for_layers"),
    ]
    library_modules = ("vptq",)

    def write_checkpoint(self, folder, config):
        i = next(i for i, (c, _, _) in enumerate(CASES) if c == config)
        _, dtype, model_kw = CASES[i]
        ids, logits = checkpoints.write(folder, json.loads(json.dumps(config)), dtype, seed=i, **model_kw)
        return ids, logits
