"""``HqqQuantizer``: quantizes each ``nn.Linear`` into hqq's own ``HQQLinear`` (its half-quadratic
optimizer, bit packing and PyTorch dequantize-on-forward backend), and stores it as plain tensors.

Checkpoint layout of one layer (keys relative to the module; exactly hqq's "encoded" safetensors
``HQQLinear.state_dict()``, the tensor names Transformers' HQQ integration used):
    W_q         packed codes: uint8 [rows/k, cols] (8/4/2/1 bits: k = 1/2/4/8), int32 [ceil(rows/10), cols]
                (3 bits, 10 codes per int32); viewed as the compute dtype when view_as_float.
                rows x cols is the weight regrouped: [out*in/g, g] for axis=1, [g, out*in/g] for axis=0
    scale, zero compute dtype, [out*in/g, 1] (axis=1) or [1, out*in/g] (axis=0); w = (code - zero) * scale
    bias        compute dtype [out] (when the layer has one)
    nbits, group_size, axis                     int32 scalars
    shape                                       int64 [2] = [out_features, in_features]
    packing, unpack_view_dtype, compute_dtype   uint8 strings ("4bit_u8", "torch.uint8", "torch.float32")
    view_as_float, quant_scale, quant_zero, offload_meta, encoded_state_dict, stores_quant_config,
    channel_wise, optimize, round_zero          uint8 scalars (0/1)
Loading never decodes those metadata tensors with hqq's decoder (it ``eval``s strings): each is
compared with the value the config implies for the layer, and a mismatch is a ``CheckpointError``;
the module is then rebuilt from the config's values by ``HQQLinear.load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from hqq.core.quantize import Quantizer as HqqLibQuantizer
from hqq.core.utils import encode_safetensor_type
from torch import nn

import quantplug

from .config import HqqConfig, name_matches

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: codes per storage element along the packed dimension (3 bits: 10 per int32)
PER_ELEMENT = {8: 1, 4: 2, 3: 10, 2: 4, 1: 8}
METADATA_KEYS = (
    "nbits",
    "group_size",
    "shape",
    "axis",
    "packing",
    "unpack_view_dtype",
    "view_as_float",
    "quant_scale",
    "quant_zero",
    "compute_dtype",
    "offload_meta",
    "encoded_state_dict",
    "stores_quant_config",
    "channel_wise",
    "optimize",
    "round_zero",
)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Everything about one layer's HQQ storage that follows from the config and its shape."""

    name: str
    nbits: int
    group_size: int | None  # as given (None = a whole row/column)
    groups_of: int  # effective group size
    axis: int
    view_as_float: bool
    dtype: torch.dtype
    out_features: int
    in_features: int
    has_bias: bool
    packing: str
    w_q_shape: tuple[int, ...]
    w_q_dtype: torch.dtype
    meta_shape: tuple[int, int]

    def metadata(self) -> dict[str, Any]:
        """The metadata values hqq stores beside the tensors (decoded form)."""
        return {
            "nbits": self.nbits,
            "group_size": self.groups_of,
            "shape": torch.Size([self.out_features, self.in_features]),
            "axis": self.axis,
            "packing": self.packing,
            "unpack_view_dtype": HqqLibQuantizer.unpack_view_dtype[self.packing],
            "view_as_float": self.view_as_float,
            "quant_scale": False,
            "quant_zero": False,
            "compute_dtype": self.dtype,
            "offload_meta": False,
            "encoded_state_dict": True,
            "stores_quant_config": True,
            "channel_wise": True,
            "optimize": True,
            "round_zero": self.nbits == 4,  # BaseQuantizeConfig's choice
        }

    def encoded_metadata(self) -> dict[str, torch.Tensor]:
        return {k: encode_safetensor_type(v) for k, v in self.metadata().items()}

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {
            "W_q": (self.w_q_shape, self.w_q_dtype),
            "scale": (self.meta_shape, self.dtype),
            "zero": (self.meta_shape, self.dtype),
        }
        if self.has_bias:
            out["bias"] = ((self.out_features,), self.dtype)
        out.update({k: (tuple(t.shape), t.dtype) for k, t in self.encoded_metadata().items()})
        return out

    def base_quantize_config(self) -> dict[str, Any]:
        return BaseQuantizeConfig(
            nbits=self.nbits, group_size=self.group_size, axis=self.axis, view_as_float=self.view_as_float
        )


def layer_plan(name: str, linear: nn.Module, settings: dict[str, Any]) -> LayerPlan:
    """The storage plan of ``linear`` under ``settings``; a ``ConfigError`` naming the layer when the
    settings cannot apply to its shape or dtype."""
    out_f, in_f = linear.out_features, linear.in_features
    dtype = linear.weight.dtype
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
    numel = out_f * in_f
    rows, cols = (numel // g, g) if axis == 1 else (g, numel // g)
    k = PER_ELEMENT[nbits]
    if nbits == 3:
        w_q_shape, w_q_dtype = (math.ceil(rows / 10), cols), torch.int32
    else:
        if rows % k:
            raise quantplug.ConfigError(
                f"layer {name!r} (Linear {in_f} -> {out_f}): hqq packs {k} {nbits}-bit codes per byte along "
                f"the {rows} groups of group_size={gs}, which {k} does not divide; choose another group_size "
                f"or list the layer in skip_modules",
                field="group_size",
                value=gs,
                allowed=f"a group size giving a multiple of {k} groups",
            )
        w_q_shape, w_q_dtype = (rows // k, cols), torch.uint8
    if vaf:
        nbytes = cols * w_q_dtype.itemsize
        if nbytes % dtype.itemsize:
            raise quantplug.ConfigError(
                f"layer {name!r}: view_as_float cannot view its packed rows ({nbytes} bytes) as {dtype}; "
                f"set view_as_float=false or choose another group_size",
                field="view_as_float",
                value=vaf,
                allowed=[False],
            )
        w_q_shape, w_q_dtype = (w_q_shape[0], nbytes // dtype.itemsize), dtype
    return LayerPlan(
        name=name,
        nbits=nbits,
        group_size=gs,
        groups_of=g,
        axis=axis,
        view_as_float=vaf,
        dtype=dtype,
        out_features=out_f,
        in_features=in_f,
        has_bias=linear.bias is not None,
        packing=HqqLibQuantizer.bit_to_packing[nbits],
        w_q_shape=w_q_shape,
        w_q_dtype=w_q_dtype,
        meta_shape=(numel // g, 1) if axis == 1 else (1, numel // g),
    )


def _describe(t: torch.Tensor) -> str:
    """A stored metadata tensor, readably (strings are uint8 vectors); never evaluated."""
    if t.dtype == torch.uint8 and t.dim() == 1:
        return repr("".join(chr(c) for c in t.tolist()))
    return repr(t.tolist())


class HqqQuantizer(quantplug.Quantizer):
    config: HqqConfig

    def _settings(self, name: str) -> dict[str, Any]:
        settings = self.config.layer_settings(name)
        if settings is None:
            raise quantplug.ConfigError(
                f"layer {name!r} matches no dynamic_config entry, so this config leaves it in full precision",
                field="dynamic_config",
                value=self.config.dynamic_config,
                allowed="an entry whose linear tag matches the layer",
            )
        return settings

    def plan(self, name: str, linear: nn.Module) -> LayerPlan:
        return layer_plan(name, linear, self._settings(name))

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        if name_matches(name, self.config.skip_modules):
            return "listed in skip_modules"
        if self.config.layer_settings(name) is None:
            return "matches no dynamic_config entry (as in Transformers, only listed layers are quantized)"
        self.plan(name, module)  # refuses, naming the layer, before any layer is quantized
        return None

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        plan = self.plan(name, module)
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
            plan.base_quantize_config(),
            compute_dtype=plan.dtype,
            device=str(weight.device),
            del_orig=True,  # frees hqq's own stand-in Linear; ``module`` is untouched
        )
        self._check_layout(plan, self.module_tensors(name, qmodule), "quantizing")
        return qmodule

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in qmodule.state_dict().items()}

    def expected_tensors(self, name: str, module: nn.Linear):
        return self.plan(name, module).expected()

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        plan = self.plan(name, module)
        tensors = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in plan.expected().items()}
        return self._build(plan, tensors, "meta")

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        plan = self.plan(name, module)
        self._check_layout(plan, tensors, "loading")
        encoded = plan.encoded_metadata()
        for key in METADATA_KEYS:
            if not torch.equal(tensors[key].cpu(), encoded[key]):
                raise quantplug.CheckpointError(
                    f"layer {name!r}: stored {key}={_describe(tensors[key].cpu())} does not match what the "
                    f"checkpoint's quantization_config implies for this layer ({_describe(encoded[key])}); "
                    f"the checkpoint is inconsistent"
                )
        return self._build(plan, tensors, str(tensors["W_q"].device))

    # -- helpers ------------------------------------------------------------------------------

    def _check_layout(self, plan: LayerPlan, tensors: dict[str, torch.Tensor], doing: str) -> None:
        expected = plan.expected()
        if set(tensors) != set(expected):
            raise quantplug.CheckpointError(
                f"layer {plan.name!r}: {doing} found tensors {sorted(tensors)}, expected {sorted(expected)} "
                f"(hqq {doing} produced an unknown layout)"
            )
        for key, (shape, dtype) in expected.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise quantplug.CheckpointError(
                    f"layer {plan.name!r}: tensor {key!r} is {t.dtype} {list(t.shape)}, expected {dtype} "
                    f"{list(shape)} ({doing})"
                )

    @staticmethod
    def _build(plan: LayerPlan, tensors: dict[str, torch.Tensor], device: str) -> HQQLinear:
        """An HQQLinear holding ``tensors``, through hqq's own (non-encoded) ``load_state_dict``."""
        state: dict[str, Any] = dict(plan.metadata())
        del state["encoded_state_dict"]  # the values below are decoded already: nothing is eval'd
        state["W_q"] = tensors["W_q"]
        state["scale"] = tensors["scale"]
        state["zero"] = tensors["zero"]
        if plan.has_bias:
            state["bias"] = tensors["bias"]
        qmodule = HQQLinear(
            None,
            plan.base_quantize_config(),
            compute_dtype=plan.dtype,
            device=device,
            initialize=False,
        )
        qmodule.load_state_dict(state)
        return qmodule
