"""The load-only conformance kit on checkpoints amd-quark quantized and exported itself (see
``quark_oracle``): each loads with the logits of Transformers + amd-quark's own ``QParamsLinear``."""

from __future__ import annotations

import copy

from quark_oracle import CONFIGS, FP8_T, MXFP4, copy_checkpoint, exported, layer, qconfig, spec

from quantplug.testing import LoadOnlyConformance


def _with(path: str, value) -> dict:
    """``CONFIGS["fp8-w8a8-static"]`` with the item at dotted ``path`` set to ``value``."""
    config = copy.deepcopy(CONFIGS["fp8-w8a8-static"])
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    return config


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "quant_method"}


W = "global_quant_config.weight"
A = "global_quant_config.input_tensors"


class TestQuarkConformance(LoadOnlyConformance):
    backend_name = "quark"
    configs = [_strip(c) for c in CONFIGS.values()]
    bad_configs = [
        (_strip(_with(f"{W}.dtype", "fp8_e5m2")), f"{W}.dtype"),
        (_strip(_with(f"{W}.dtype", "int2")), f"{W}.dtype"),
        (_strip(_with(f"{W}.qscheme", "per_block")), f"{W}.qscheme"),
        (_strip(_with(W, spec("int8", "per_group", ch_axis=-1, group_size=32))), f"{W}.qscheme"),
        (_strip(_with(W, spec("int4", "per_channel", ch_axis=1))), f"{W}.ch_axis"),
        (_strip(_with(W, [FP8_T, FP8_T])), W),
        (_strip(_with(W, {**MXFP4, "group_size": 16})), f"{W}.group_size"),
        (_strip(_with(W, {**MXFP4, "scale_format": None})), f"{W}.scale_format"),
        (_strip(_with(W, {**FP8_T, "zero_point_type": "float32"})), f"{W}.zero_point_type"),
        (_strip(_with(W, {**FP8_T, "mx_element_dtype": "fp4", "dtype": "mx"})), f"{W}.mx_element_dtype"),
        (_strip(_with(W, {**FP8_T, "colour": "red"})), f"{W}.colour"),
        (_strip(_with(A, {**FP8_T, "is_dynamic": True})), f"{A}.is_dynamic"),
        (_strip(_with(A, {**MXFP4, "is_dynamic": True, "group_size": 16})), f"{A}.group_size"),
        (_strip(_with(A, {**MXFP4, "is_dynamic": False})), f"{A}.dtype"),
        (_strip(_with(A, spec("fp8_e4m3", "per_channel", ch_axis=1))), f"{A}.qscheme"),
        (_strip(_with("global_quant_config.bias", FP8_T)), "global_quant_config.bias"),
        (_strip(_with("export.pack_method", "zigzag")), "export.pack_method"),
        (_strip(_with("export.weight_format", "fake_quantized")), "export.weight_format"),
        (_strip(_with("softmax_quant_spec", FP8_T)), "softmax_quant_spec"),
        (_strip(_with("algo_config", [{"name": "rotation"}])), "algo_config"),
        (_strip(_with("quant_mode", "fx_graph_mode")), "quant_mode"),
        (
            _strip(_with("layer_quant_config", {"*q_proj": layer(spec("fp8_e5m2", "per_tensor"))})),
            "layer_quant_config.*q_proj.weight.dtype",
        ),
        (
            _strip(qconfig(layer(FP8_T), kv={"*k_proj": layer(FP8_T, None, {**FP8_T, "is_dynamic": True})})),
            "kv_cache_quant_config.*k_proj.output_tensors.is_dynamic",
        ),
    ]
    library_modules = ("quark",)

    def write_checkpoint(self, folder, config):
        made = exported({"quant_method": "quark", **config})
        copy_checkpoint(made["folder"], folder)
        return made["ids"], made["reference"]
