"""``TorchaoQuantizer`` and ``TorchaoLinear``: torchao's ``quantize_`` applied one layer at a time.

A quantized layer is a ``TorchaoLinear`` (an ``nn.Linear`` subclass, so the core never converts it
twice) whose ``weight`` is the torchao tensor subclass ``quantize_`` made (``Int8Tensor``,
``IntxUnpackedToInt8Tensor``, ``Float8Tensor``, ``Int4TilePackedTo4dTensor``, ...); torchao's
subclass does the matmul. In a checkpoint the subclass is flattened exactly as torchao's
``flatten_tensor_state_dict`` (which Transformers uses) flattens it: ``<layer>._weight_<name>`` for
each of its tensor data (``qdata``, ``scale``, ``zero_point``, ...), plus ``<layer>.bias``. Loading
rebuilds it with torchao's ``unflatten_tensor_state_dict``, taking the subclass attributes
(block size, dtype, activation quantization) from the config, not from file metadata.

``TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1`` is set before torchao is imported when it is not set and
torch has no CUDA: the published torchao wheel is a CUDA build whose C++ extensions fail to load on
a CPU-only torch (two "Failed to load ... .so" lines on every import); none of the modes this plugin
runs on CPU needs them. It has no effect if torchao was imported earlier; so importing this
package already sets it on machines without an NVIDIA driver, before Transformers (which imports
torchao with its model classes) can import torchao (``quantplug_torchao.quiet_torchao_import``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings

import torch
from torch import nn

import quantplug

from . import grid
from .config import INT4_GROUP_SIZES, INT4_PACKING_FORMATS, INTX_BITS, MODE_REQUIREMENTS, TorchaoConfig

if "TORCHAO_FORCE_SKIP_LOADING_SO_FILES" not in os.environ and not torch.cuda.is_available():
    os.environ["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"  # (this package's import did it without NVIDIA)

import torchao  # noqa: E402
from torchao.core.config import config_from_dict  # noqa: E402
from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict  # noqa: E402
from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8DynamicActivationFloat8WeightConfig,
    Int4WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerGroup,
    PerRow,
    quantize_,
)

SUPPORTED_TORCHAO = ((0, 18), (0, 19))  # [low, high): keep in step with pyproject and Backend.requires


def _check_torchao_version() -> None:
    """The installed metadata is checked by quantplug; this checks the module actually imported."""
    version = tuple(int(p) for p in re.findall(r"\d+", torchao.__version__.split("+")[0])[:2])
    if len(version) == 2 and not (SUPPORTED_TORCHAO[0] <= version < SUPPORTED_TORCHAO[1]):
        raise quantplug.BackendUnavailableError(
            f"torchao {torchao.__version__} is imported, but quantplug-torchao supports torchao "
            f">=0.18,<0.19 (torchao's config and tensor layouts change between minor versions). "
            f"Fix: pip install 'torchao>=0.18,<0.19'"
        )


def tensor_data(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors of a torchao tensor subclass, by data name (as torchao flattens it:
    ``tensor_data_names`` then the ``optional_tensor_data_names`` that are set)."""
    names = list(weight.tensor_data_names) + list(getattr(weight, "optional_tensor_data_names", ()))
    return {n: getattr(weight, n) for n in names if getattr(weight, n) is not None}


def subclass_metadata(weight: torch.Tensor) -> str:
    """torchao's safetensors metadata entry for one tensor subclass (what Transformers stores)."""
    return json.dumps(weight, cls=TensorSubclassAttributeJSONEncoder)


def _label(value) -> str:
    """An enum (or the bare string torchao keeps when ``_data`` held one) as its value, lowercase."""
    return str(getattr(value, "value", value)).lower()


def _unsupported(ao) -> str | None:
    """Why this plugin does not run ``ao``, a config torchao accepted (None: it does)."""
    name = type(ao).__name__
    if isinstance(ao, IntxWeightOnlyConfig):
        if ao.weight_dtype not in [getattr(torch, f"int{b}") for b in INTX_BITS]:
            return f"{name}: weight_dtype {ao.weight_dtype} is not one of int2 .. int8"
        g = ao.granularity
        if isinstance(g, PerGroup) and not (type(g.group_size) is int and g.group_size >= 1):
            return f"{name}: PerGroup group_size {g.group_size!r} must be a positive integer"
        if _label(ao.intx_packing_format) != "unpacked_to_int8":
            return (
                f"{name}: intx_packing_format {_label(ao.intx_packing_format)!r} needs torchao's C++ CPU "
                "kernels, which the published torchao wheel does not ship; use UNPACKED_TO_INT8"
            )
    elif isinstance(ao, Int4WeightOnlyConfig):
        if ao.group_size not in INT4_GROUP_SIZES:
            return f"{name}: group_size {ao.group_size!r} is not one of {INT4_GROUP_SIZES}"
        if _label(ao.int4_packing_format) not in INT4_PACKING_FORMATS:
            fmt = _label(ao.int4_packing_format)
            return f"{name}: int4_packing_format {fmt!r} is not one of {INT4_PACKING_FORMATS}"
    elif not isinstance(ao, Float8DynamicActivationFloat8WeightConfig):  # int8, int8 dynamic, float8
        if not (isinstance(ao.granularity, PerRow) and type(ao.granularity.dim) is int):
            return f"{name}: granularity must be PerRow (one scale per output channel)"
        if getattr(ao, "weight_dtype", torch.float8_e4m3fn) != torch.float8_e4m3fn:
            return f"{name}: weight_dtype must be float8_e4m3fn"
    return None


class TorchaoLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao tensor subclass (torchao computes the matmul)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        # nn.Module's __init__, not nn.Linear's: that one would build and randomly initialize a weight
        # only to discard it (~0.4 ms a layer even on the meta device; bench/overhead.py).
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight={type(self.weight).__name__}"
        )


class TorchaoQuantizer(quantplug.Quantizer):
    config: TorchaoConfig

    def __init__(self, backend, config):
        super().__init__(backend, config)
        _check_torchao_version()
        self._device: torch.device | None = None

    def check_config(self) -> None:
        """torchao parses ``quant_type["default"]`` (``config_from_dict``) and checks its values;
        what torchao accepts but this plugin does not run is refused too (``_unsupported``)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchao warns on every non-default config version
                self.ao_config = config_from_dict(self.config.quant_type["default"])
        except Exception as exc:  # torchao raises ValueError, TypeError, AttributeError, ...
            why = f"torchao {torchao.__version__} rejects it: {type(exc).__name__}: {exc}"
        else:
            why = _unsupported(self.ao_config)
        if why:
            raise self.config.invalid(
                "quant_type", "a torchao 0.18 config this plugin runs (see its README)", why
            )

    # -- where it runs ---------------------------------------------------------------------------

    def validate_environment(self, device: torch.device | str) -> None:
        """Per-mode device rules (the union is in Capabilities.devices): refuse up front, with the
        reason, a mode that cannot run on ``device``."""
        kind, mode, fmt = str(device).split(":")[0], self.config.mode, self.config.int4_packing_format
        mslk = fmt in ("plain", "preshuffled")
        need = MODE_REQUIREMENTS.get(mode)
        if fmt is not None:
            need = f"{'the mslk package' if mslk else 'a CUDA GPU'} for int4_packing_format {fmt!r}"
        if kind not in self.config.devices:
            alt = (
                " On CPU use TorchaoConfig.from_mode('intx_weight_only', bits=4) or for_bits(4)."
                if fmt is not None
                else " On CPU use float8_weight_only or int8_dynamic_activation_int8_weight."
                if mode.startswith("float8")
                else ""
            )
            raise quantplug.BackendUnavailableError(
                f"torchao mode {mode!r} does not run on {kind!r}; it runs on {', '.join(self.config.devices)}"
                + (f" and needs {need}." if need else ".")
                + alt
            )
        if kind == "cuda" and not torch.cuda.is_available():
            raise quantplug.BackendUnavailableError(
                f"torchao mode {mode!r} does not run on 'cuda' here: this torch build has no usable CUDA "
                f"(torch {torch.__version__}). Pass device='cpu' for a CPU mode."
            )
        if mslk and importlib.util.find_spec("mslk") is None:
            raise quantplug.BackendUnavailableError(
                f"torchao mode 'int4_weight_only' with int4_packing_format {fmt!r} does not run on {kind!r} "
                f"without the mslk package (torchao: 'Requires mslk >= 1.0.0'). Fix: pip install "
                f"'mslk>=1.0.0', or on CUDA use int4_packing_format='tile_packed_to_4d'."
            )
        if mode == "float8_dynamic_activation_float8_weight":
            cap = torch.cuda.get_device_capability(torch.device(device))
            if cap < (8, 9):
                raise quantplug.BackendUnavailableError(
                    f"torchao mode {mode!r} does not run on this GPU ({torch.cuda.get_device_name(torch.device(device))}, "
                    f"compute capability {cap[0]}.{cap[1]}): it needs {need}. Use float8_weight_only or "
                    f"int8_dynamic_activation_int8_weight."
                )
        self._device = torch.device(device) if kind != "meta" else None

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        g = self.config.group_size
        in_f, out_f = module.in_features, module.out_features
        if g is not None and g > 0 and in_f % g:
            return (
                f"in_features={in_f} is not divisible by group_size={g} (torchao {self.config.mode} quantizes "
                f"whole groups only); left in full precision"
            )
        if self.config.mode == "float8_dynamic_activation_float8_weight" and (in_f % 16 or out_f % 16):
            return (
                f"in_features={in_f} / out_features={out_f} are not multiples of 16, which torch's float8 "
                f"matmul (_scaled_mm) needs; left in full precision"
            )
        return None

    # -- quantize ----------------------------------------------------------------------------------

    def _quantize_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        out_f, in_f = weight.shape
        # a carrier for quantize_ (the caller's module is untouched)
        lin = TorchaoLinear(weight.detach(), None)
        try:
            quantize_(lin, self.ao_config)
        except Exception as exc:
            raise quantplug.QuantplugError(
                f"torchao {torchao.__version__} could not quantize {name!r} ({out_f}x{in_f}, {weight.dtype}, "
                f"{weight.device}) with {self.config.torchao_type}: {type(exc).__name__}: {exc}"
            ) from exc
        w = lin.weight
        if not hasattr(w, "tensor_data_names"):
            raise quantplug.QuantplugError(
                f"torchao left {name!r} unquantized ({type(w).__name__}) with {self.config.torchao_type}"
            )
        return w

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        return TorchaoLinear(self._quantize_weight(name, module.weight), module.bias)

    def offload_refusal(self) -> str | None:
        return (
            "torchao's weights are tensor subclasses (e.g. Int8Tensor), which accelerate's offload cannot "
            "write out ('.numpy() is not supported for tensor subclasses')"
        )

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        """``quantize_`` on the meta device gives the subclass's layout without data. Where a layout's
        packing op has no meta kernel (int4 on CUDA), a zero weight is quantized on the target device."""
        shape, dtype = (module.out_features, module.in_features), module.weight.dtype
        try:
            w = self._quantize_weight(name, torch.empty(shape, dtype=dtype, device="meta"))
        except quantplug.QuantplugError:
            if self._device is None or self._device.type == "cpu":
                raise
            w = self._quantize_weight(name, torch.zeros(shape, dtype=dtype, device=self._device))
        bias = None if module.bias is None else torch.empty(module.out_features, dtype=dtype, device="meta")
        return TorchaoLinear(w, bias)

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint_metadata(self, modules: dict[str, nn.Module], stored: list[str]) -> dict[str, str]:
        """torchao's header entries, as its ``flatten_tensor_state_dict`` writes them: each quantized
        weight described (``"<layer>.weight": {"_type": ..., "_data": ...}``), every other stored
        tensor ``{"_type": "Tensor"}``, and ``tensor_names`` naming them all in file order.
        Transformers' torchao loader and vLLM's rebuild the model from these (vLLM loads only the
        tensors ``tensor_names`` names: unnamed embeddings and norms stayed uninitialised, NaN
        logits); quantplug itself rebuilds them from the config and does not read these."""
        meta = {
            f"{name}.weight": subclass_metadata(module.weight)
            for name, module in modules.items()
            if isinstance(module, TorchaoLinear)
        }
        if not meta:
            return {}
        names: dict[str, None] = {}  # in file order
        for key in stored:
            layer, flattened, _ = key.partition("._weight_")
            names.setdefault(f"{layer}.weight" if flattened and f"{layer}.weight" in meta else key)
        plain = json.dumps({"_type": torch.Tensor.__name__})
        meta.update({name: plain for name in names if name not in meta})
        meta["tensor_names"] = json.dumps(list(names))
        return meta

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        out = {f"_weight_{k}": t for k, t in tensor_data(qmodule.weight).items()}
        if qmodule.bias is not None:
            out["bias"] = qmodule.bias.detach()
        return out

    def expected_tensors(self, name: str, module: nn.Linear):
        empty = self.empty_module(name, module)
        return {k: (tuple(t.shape), t.dtype) for k, t in self.module_tensors(name, empty).items()}

    def integer_grid(self, name: str, qmodule: nn.Module):
        """int8_weight_only and intx_weight_only layers (unpacked int8 codes, grid.py); the other
        modes are not grids (float8, int8 activations, int4's packed layouts)."""
        return grid.integer_grid(name, qmodule)

    def encode_grid(self, name: str, module: nn.Linear, integer_grid: quantplug.IntegerGrid) -> nn.Module:
        """The layer ``load_module`` rebuilds (torchao's unflatten) from the grid's tensors."""
        layout = lambda: self.expected_tensors(name, module)  # noqa: E731 (int4 cannot build one on CPU)
        return self.load_module(
            name, module, grid.encode_tensors(self.config, name, module, integer_grid, layout)
        )

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        empty = self.empty_module(name, module)
        data = {f"m.{k}": t for k, t in tensors.items() if k.startswith("_weight_")}
        meta = {"m.weight": subclass_metadata(empty.weight), "tensor_names": json.dumps(["m.weight"])}
        rebuilt, left = unflatten_tensor_state_dict(data, meta)
        if "m.weight" not in rebuilt or left:
            raise quantplug.CheckpointError(
                f"{name}: tensors {sorted(tensors)} do not rebuild torchao's {type(empty.weight).__name__} "
                f"for {self.config.torchao_type} (left over: {sorted(left)})"
            )
        bias = tensors.get("bias")
        if (bias is None) != (module.bias is None):
            raise quantplug.CheckpointError(f"{name}: bias {'missing' if bias is None else 'unexpected'}")
        return TorchaoLinear(rebuilt["m.weight"], bias)
