"""amd-quark 0.13 as the tests' oracle: tiny random-weight Llama checkpoints quantized with Quark's own
``ModelQuantizer`` (calibrated on token ids, on the CPU) and written by its own exporter
(``export_safetensors``), and reference logits from Quark's own modules:

- ``reference``: the export loaded back by Transformers 5.25 with amd-quark installed
  (``from_pretrained`` -> Quark's ``QParamsLinear``, its ``_forward_generic`` on CPU);
- ``quantized``: the in-memory model Quark quantized (its ``QuantLinear`` fake quantization), before
  export.

Each configuration is quantized once per test process (amd-quark's import alone takes ~30 s) and
copied into each test's folder.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

OBSERVERS = {
    "per_tensor": "PerTensorMinMaxObserver",
    "per_channel": "PerChannelMinMaxObserver",
    "per_group": "PerGroupMinMaxObserver",
}


def spec(dtype: str, qscheme: str, **kw: Any) -> dict[str, Any]:
    """A tensor spec as Quark 0.13 exports it (``QTensorConfig.to_dict``)."""
    out = {
        "dtype": dtype,
        "is_dynamic": False,
        "qscheme": qscheme,
        "ch_axis": None,
        "group_size": None,
        "block_size": None,
        "symmetric": True,
        "round_method": "half_even",
        "scale_type": "float",
        "zero_point_type": "int32",
        "scale_format": None,
        "scale_calculation_mode": None,
        "mx_element_dtype": None,
        "observer_cls": OBSERVERS[qscheme],
        "is_scale_quant": False,
        "enable_buffer_reuse": False,
        "max_input_numel": 4194304,
    }
    out.update(kw)
    return out


def layer(weight=None, inputs=None, outputs=None) -> dict[str, Any]:
    return {
        "input_tensors": inputs,
        "output_tensors": outputs,
        "weight": weight,
        "bias": None,
        "target_device": None,
    }


def qconfig(
    global_layer, *, exclude=("lm_head",), layers=None, kv=None, pack_method="reorder"
) -> dict[str, Any]:
    """A whole ``quantization_config`` as Quark 0.13 exports it (``QConfig.to_dict`` + ``export``)."""
    return {
        "quant_method": "quark",
        "global_quant_config": global_layer,
        "exclude": list(exclude),
        "algo_config": None,
        "softmax_quant_spec": None,
        "layer_type_quant_config": {},
        "layer_quant_config": layers or {},
        "kv_cache_quant_config": kv or {},
        "kv_cache_post_rope": False,
        "quant_mode": "eager_mode",
        "version": "0.13",
        "export": {
            "kv_cache_group": [],
            "min_kv_scale": 0.0,
            "pack_method": pack_method,
            "weight_format": "real_quantized",
            "weight_merge_groups": None,
        },
    }


FP8_T = spec("fp8_e4m3", "per_tensor")
FP8_CH = spec("fp8_e4m3", "per_channel", ch_axis=0)
INT8_CH = spec("int8", "per_channel", ch_axis=0)
INT8_T = spec("int8", "per_tensor")
UINT4_G32 = spec("uint4", "per_group", ch_axis=-1, group_size=32, symmetric=False)
INT4_G64 = spec("int4", "per_group", ch_axis=-1, group_size=64)
MXFP4 = spec(
    "fp4",
    "per_group",
    ch_axis=-1,
    group_size=32,
    scale_format="e8m0",
    scale_calculation_mode="even",
    observer_cls="PerBlockMXObserver",
)

CONFIGS = {
    "fp8-w8a8-static": qconfig(layer(FP8_T, FP8_T)),
    "fp8-per-channel-weight-only": qconfig(layer(FP8_CH)),
    "int8-per-channel-a8-static": qconfig(layer(INT8_CH, INT8_T)),
    "uint4-g32-asym-reorder": qconfig(layer(UINT4_G32)),
    "mxfp4": qconfig(layer(MXFP4)),
    "w-mxfp4-a-mxfp4": qconfig(layer(MXFP4, {**MXFP4, "is_dynamic": True})),
}


def quark_or_skip() -> None:
    """Import amd-quark's torch package (it compiles its C++ extension on first import), or skip
    saying why."""
    try:
        import quark.torch  # noqa: F401
    except Exception as exc:  # not installed, or its C++ build failed (needs g++ and ninja)
        pytest.skip(f"amd-quark (the oracle) is not usable here: {type(exc).__name__}: {exc}")


_ROOT = Path(tempfile.mkdtemp(prefix="quantplug-quark-oracle-"))
_CACHE: dict[str, dict[str, Any]] = {}


def exported(config: dict[str, Any], dtype: str = "float32", bias: bool = False) -> dict[str, Any]:
    """Quantize a tiny Llama (with biases in every Linear but the head when ``bias``) with Quark per
    ``config``, export it; returns ``folder``, ``ids``, ``reference`` (Transformers + Quark's reload)
    and ``quantized`` (Quark's in-memory model) logits."""
    key = json.dumps([config, dtype, bias], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = _export(copy.deepcopy(config), dtype, bias, _ROOT / f"c{len(_CACHE)}")
    return _CACHE[key]


def _export(config: dict[str, Any], dtype: str, bias: bool, folder: Path) -> dict[str, Any]:
    import torch

    from quantplug.testing import tiny_llama, token_ids

    quark_or_skip()
    from quark.torch import ModelQuantizer, export_safetensors
    from quark.torch.quantization.config.config import QConfig

    model = tiny_llama(seed=0, attention_bias=bias, mlp_bias=bias).to(getattr(torch, dtype))
    if bias:  # (Transformers initialises biases to zero)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
    calibration = [token_ids(shape=(2, 16), seed=s) for s in range(4)]
    quantizer = ModelQuantizer(QConfig.from_dict(config))
    model = quantizer.freeze(quantizer.quantize_model(model, calibration))
    ids = token_ids(shape=(2, 12), seed=99)
    with torch.no_grad():
        quantized = model(ids).logits
    export_safetensors(
        model,
        folder,
        custom_mode="quark",
        weight_format="real_quantized",
        pack_method=config["export"]["pack_method"],
    )
    written = json.loads((folder / "config.json").read_text())["quantization_config"]
    # (Quark writes `exclude` as the full names its patterns matched)
    assert {**written, "exclude": None} == {**config, "exclude": None}, (
        "Quark exported another quantization_config"
    )
    return {
        "folder": folder,
        "ids": ids,
        "quantized": quantized,
        "reference": transformers_logits(folder, ids),
    }


def transformers_model(folder: Path, **kwargs: Any):
    """``folder`` loaded by Transformers 5.25 with amd-quark (its layers Quark's ``QParamsLinear``)."""
    from transformers import AutoModelForCausalLM

    quark_or_skip()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    assert "QParamsLinear" in type(model.model.layers[0].mlp.up_proj).__name__
    return model


def transformers_logits(folder: Path, ids, **kwargs: Any):
    import torch

    with torch.no_grad():
        return transformers_model(folder, **kwargs)(ids).logits


def copy_checkpoint(source: Path, folder: Path) -> None:
    shutil.copytree(source, folder, dirs_exist_ok=True)
