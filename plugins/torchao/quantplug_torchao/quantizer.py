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
runs on CPU needs them. It has no effect if torchao was imported earlier.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import torch
from torch import nn

import quantplug

from .config import MODE_REQUIREMENTS, TorchaoConfig

if "TORCHAO_FORCE_SKIP_LOADING_SO_FILES" not in os.environ and not torch.cuda.is_available():
    os.environ["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"

import torchao  # noqa: E402
from torchao.core.config import config_from_dict  # noqa: E402
from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict  # noqa: E402
from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402

SUPPORTED_TORCHAO = ((0, 18), (0, 19))  # [low, high): keep in step with pyproject and Backend.requires


def _check_torchao_version() -> None:
    """The installed metadata is checked by quantplug; this checks the module actually imported."""
    parts = torchao.__version__.split("+")[0].split(".")
    try:
        version = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        return
    if not (SUPPORTED_TORCHAO[0] <= version < SUPPORTED_TORCHAO[1]):
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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchao warns on every non-default config version
                self.ao_config = config_from_dict(config.quant_type["default"])
        except Exception as exc:
            raise quantplug.ConfigError(
                f"TorchaoConfig: torchao {torchao.__version__} rejects quant_type "
                f"{config.quant_type['default'].get('_type')}: {type(exc).__name__}: {exc}",
                field="quant_type",
                value=config.quant_type,
                allowed="a config torchao accepts",
            ) from None
        self._device: torch.device | None = None

    # -- where it runs ---------------------------------------------------------------------------

    def validate_environment(self, device: torch.device | str) -> None:
        """Per-mode device rules (the union is in Capabilities.devices): refuse up front, with the
        reason, a mode that cannot run on ``device``."""
        kind = str(device).split(":")[0]
        mode = self.config.mode
        allowed = self.config.devices
        need = MODE_REQUIREMENTS.get(mode)
        if mode == "int4_weight_only":
            fmt = self.config.int4_packing_format
            need = (
                f"the mslk package for int4_packing_format {fmt!r}"
                if fmt in ("plain", "preshuffled")
                else f"a CUDA GPU for int4_packing_format {fmt!r}"
            )
        if kind not in allowed:
            alt = (
                " On CPU use TorchaoConfig.from_mode('intx_weight_only', bits=4) or for_bits(4)."
                if mode == "int4_weight_only"
                else " On CPU use float8_weight_only or int8_dynamic_activation_int8_weight."
                if mode.startswith("float8")
                else ""
            )
            raise quantplug.BackendUnavailableError(
                f"torchao mode {mode!r} does not run on {kind!r}; it runs on {', '.join(allowed)}"
                + (f" and needs {need}." if need else ".")
                + alt
            )
        if kind == "cuda" and not torch.cuda.is_available():
            raise quantplug.BackendUnavailableError(
                f"torchao mode {mode!r} does not run on 'cuda' here: this torch build has no usable CUDA "
                f"(torch {torch.__version__}). Pass device='cpu' for a CPU mode."
            )
        if mode == "int4_weight_only":
            fmt = self.config.int4_packing_format
            if fmt in ("plain", "preshuffled") and importlib.util.find_spec("mslk") is None:
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

    def checkpoint_metadata(self, modules: dict[str, nn.Module]) -> dict[str, str]:
        """torchao's per-tensor header entries (``"<layer>.weight": {"_type": ..., "_data": ...}`` and
        ``tensor_names``), which Transformers' torchao loader needs to rebuild the tensor subclasses.
        quantplug itself rebuilds them from the config and does not read these."""
        meta = {
            f"{name}.weight": subclass_metadata(module.weight)
            for name, module in modules.items()
            if isinstance(module, TorchaoLinear)
        }
        if meta:
            meta["tensor_names"] = json.dumps(sorted(meta))
        return meta

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        out = {f"_weight_{k}": t for k, t in tensor_data(qmodule.weight).items()}
        if qmodule.bias is not None:
            out["bias"] = qmodule.bias.detach()
        return out

    def expected_tensors(self, name: str, module: nn.Linear):
        empty = self.empty_module(name, module)
        return {k: (tuple(t.shape), t.dtype) for k, t in self.module_tensors(name, empty).items()}

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
