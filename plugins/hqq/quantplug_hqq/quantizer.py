"""``HqqQuantizer``: quantizes each ``nn.Linear`` into hqq's own ``HQQLinear`` (its half-quadratic
optimizer, bit packing and PyTorch dequantize-on-forward backend), and stores it as plain tensors:
exactly hqq's "encoded" safetensors ``HQQLinear.state_dict()`` (the layout is in the README).

What a layer's checkpoint must hold is read off an ``HQQLinear`` that hqq builds for the layer's
shape on the meta device (``empty_module``; hqq's optimizer reads values, so it is off there: it
changes no shape). Loading never decodes the stored metadata tensors with hqq's decoder (it
``eval``s strings): each must equal the one that meta-built module holds, else ``CheckpointError``;
the layer is then rebuilt by ``HQQLinear.load_state_dict`` from that module's decoded values.
"""

from __future__ import annotations

from typing import Any

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from hqq.core.quantize import Quantizer as HqqLibQuantizer
from torch import nn

import quantplug

from . import grid
from .config import HqqConfig

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WEIGHTS = ("W_q", "scale", "zero", "bias")  # hqq's tensors; the rest of its state is metadata


def _describe(t: torch.Tensor) -> str:
    """A stored metadata tensor, readably (strings are uint8 vectors); never evaluated."""
    if t.dtype == torch.uint8 and t.dim() == 1:
        return repr("".join(chr(c) for c in t.tolist()))
    return repr(t.tolist())


def _refuse(name: str, linear: nn.Module, settings: dict[str, Any]) -> None:
    """A ``ConfigError`` naming the layer when ``settings`` cannot apply to its shape or dtype."""
    out_f, in_f, dtype = linear.out_features, linear.in_features, linear.weight.dtype
    nbits, gs, axis, vaf = (settings[k] for k in ("nbits", "group_size", "axis", "view_as_float"))
    if dtype not in COMPUTE_DTYPES:
        raise quantplug.ConfigError(
            f"layer {name!r}: weight dtype {dtype} is not one HQQ computes in (float16, bfloat16, float32); "
            f"cast the model to one of them first",
            field="dtype",
            value=str(dtype),
            allowed=[str(d) for d in COMPUTE_DTYPES],
        )
    dim, dim_name = (in_f, "in_features") if axis == 1 else (out_f, "out_features")
    g = dim if gs is None else gs
    if dim % g:
        divisors = [d for d in (32, 64, 128, 256) if dim % d == 0]
        raise quantplug.ConfigError(
            f"layer {name!r} (Linear {in_f} -> {out_f}): group_size={gs} does not divide its {dim_name} "
            f"({dim}, grouped along axis={axis}); use a group_size that does "
            f"({', '.join(map(str, divisors)) or 'null for one group per row'}), or list the layer in "
            f"skip_modules",
            field="group_size",
            value=gs,
            allowed=divisors or [None],
        )
    # hqq regroups the weight to rows x cols, then packs codes along rows into its packing's dtype
    rows, cols = (out_f * in_f // g, g) if axis == 1 else (g, out_f * in_f // g)
    packed = HqqLibQuantizer.unpack_view_dtype[HqqLibQuantizer.bit_to_packing[nbits]]
    k = torch.iinfo(packed).bits // nbits  # codes per element: 8/4/2/1 bits 1/2/4/8, 3 bits 10
    if nbits != 3 and rows % k:  # (3-bit packing pads to a multiple of 10)
        raise quantplug.ConfigError(
            f"layer {name!r} (Linear {in_f} -> {out_f}): hqq packs {k} {nbits}-bit codes per byte along "
            f"the {rows} groups of group_size={gs}, which {k} does not divide; choose another group_size "
            f"or list the layer in skip_modules",
            field="group_size",
            value=gs,
            allowed=f"a group size giving a multiple of {k} groups",
        )
    nbytes = cols * packed.itemsize
    if vaf and nbytes % dtype.itemsize:
        raise quantplug.ConfigError(
            f"layer {name!r}: view_as_float cannot view its packed rows ({nbytes} bytes) as {dtype}; "
            f"set view_as_float=false or choose another group_size",
            field="view_as_float",
            value=vaf,
            allowed=[False],
        )


class HqqQuantizer(quantplug.Quantizer):
    config: HqqConfig

    def model_attributes(self) -> dict[str, object]:
        """What Transformers sets on an HQQ model, and PEFT's ``prepare_model_for_kbit_training``
        reads (PEFT wraps ``HQQLinear`` in its HQQ LoRA layer by type)."""
        return {"quantization_method": "hqq"}

    def _settings(self, name: str, linear: nn.Module) -> dict[str, Any]:
        """The layer's nbits / group_size / axis / view_as_float, checked against its shape."""
        settings = self.config.layer_settings(name)
        if settings is None:
            raise quantplug.ConfigError(
                f"layer {name!r} matches no dynamic_config entry, so this config leaves it in full precision",
                field="dynamic_config",
                value=self.config.dynamic_config,
                allowed="an entry whose linear tag matches the layer",
            )
        _refuse(name, linear, settings)
        return settings

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        # skip_modules is matched by the core (HqqConfig.skip_aliases)
        if self.config.layer_settings(name) is None:
            return "matches no dynamic_config entry (as in Transformers, only listed layers are quantized)"
        self._settings(name, module)  # refuses, naming the layer, before any layer is quantized
        return None

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        settings = self._settings(name, module)
        weight = module.weight.detach()
        if weight.device.type == "meta":
            raise quantplug.ConfigError(
                f"layer {name!r} has no data (meta device); load its weights before quantizing",
                field=None,
            )
        bias = None if module.bias is None else nn.Parameter(module.bias.detach(), requires_grad=False)
        qmodule = HQQLinear.from_weights(
            weight,
            bias,
            BaseQuantizeConfig(**settings),
            compute_dtype=weight.dtype,
            device=str(weight.device),
            del_orig=True,  # frees hqq's own stand-in Linear; ``module`` is untouched
        )
        expected = self._meta_module(settings, module).state_dict()
        self._check(name, self.module_tensors(name, qmodule), expected, "quantizing")
        return qmodule

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in qmodule.state_dict().items()}

    def offload_refusal(self) -> str | None:
        return (
            "HQQLinear keeps its scales and zero points in its meta dict, not in parameters or buffers: "
            "accelerate would offload W_q alone and run it against scales left where they were built"
        )

    def empty_module(self, name: str, module: nn.Linear) -> HQQLinear:
        return self._meta_module(self._settings(name, module), module)

    def _meta_module(self, settings: dict[str, Any], module: nn.Linear) -> HQQLinear:
        """hqq's ``HQQLinear`` for ``module``'s shape and dtype, built by hqq on the meta device:
        meta ``W_q`` / ``scale`` / ``zero`` / ``bias``, and hqq's encoded metadata as CPU tensors."""
        config = BaseQuantizeConfig(**settings)
        config["weight_quant_params"]["optimize"] = False  # it reads values; meta tensors have none
        dtype = module.weight.dtype
        meta = nn.Linear(module.in_features, module.out_features, module.bias is not None, "meta", dtype)
        qmodule = HQQLinear(meta, config, compute_dtype=dtype, device="meta", del_orig=True)
        qmodule.quant_config["weight_quant_params"]["optimize"] = True  # what quantize_module records
        return qmodule

    def integer_grid(self, name: str, qmodule: nn.Module) -> quantplug.IntegerGrid | str:
        """4 and 8-bit layers grouped along the inputs, as a grid with float zero points (grid.py)."""
        return grid.integer_grid(name, qmodule)

    def encode_grid(self, name: str, module: nn.Linear, integer_grid: quantplug.IntegerGrid) -> nn.Module:
        """The ``HQQLinear`` ``load_module`` builds from ``integer_grid`` packed as hqq stores it."""
        settings = self._settings(name, module)
        weights = grid.encode_weights(name, module, settings, integer_grid)
        meta = {k: v for k, v in self._meta_module(settings, module).state_dict().items() if k not in WEIGHTS}
        return self.load_module(name, module, {**meta, **weights})

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        settings = self._settings(name, module)
        empty = self._meta_module(settings, module)
        self._check(name, tensors, empty.state_dict(), "loading")
        empty.encoded_state_dict = False  # hqq's decoded state: the config's values, nothing eval'd
        state = {**empty.state_dict(), **{k: v for k, v in tensors.items() if k in WEIGHTS}}
        qmodule = HQQLinear(
            None,
            BaseQuantizeConfig(**settings),
            compute_dtype=module.weight.dtype,
            device=str(tensors["W_q"].device),
            initialize=False,
        )
        qmodule.load_state_dict(state)  # hqq's own, from decoded values
        return qmodule

    @staticmethod
    def _check(name: str, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], doing: str):
        """``tensors`` has ``expected``'s keys, shapes and dtypes, and its metadata values."""
        if set(tensors) != set(expected):
            raise quantplug.CheckpointError(
                f"layer {name!r}: {doing} found tensors {sorted(tensors)}, expected {sorted(expected)} "
                f"(hqq {doing} produced an unknown layout)"
            )
        for key, want in expected.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                raise quantplug.CheckpointError(
                    f"layer {name!r}: tensor {key!r} is {t.dtype} {list(t.shape)}, expected {want.dtype} "
                    f"{list(want.shape)} ({doing})"
                )
            if key not in WEIGHTS and not torch.equal(t.cpu(), want):
                raise quantplug.CheckpointError(
                    f"layer {name!r}: stored {key}={_describe(t.cpu())} does not match what the "
                    f"checkpoint's quantization_config implies for this layer ({_describe(want)}); the "
                    f"checkpoint is inconsistent"
                    if doing == "loading"
                    else f"layer {name!r}: hqq produced {key}={_describe(t.cpu())}, not the "
                    f"{_describe(want)} its config implies for this layer"
                )
