"""``CompressedTensorsQuantizer``: quantizes and loads compressed-tensors checkpoints with the
library's own scheme matching, qparam arithmetic and compressors.

- Which layers: compressed-tensors' rules (``match_targets`` / ``match_name``): a Linear is
  quantized when a ``config_groups`` target names it (exact name, ``re:`` pattern or class name,
  most specific first) and no ``ignore`` entry does.
- Quantize: the weight's min/max per tensor, channel or group (llm-compressor's default weight
  observer) -> ``calculate_qparams`` -> the format's compressor ``compress`` (quantize + pack).
  Static input scales (FP8, static W8A8) come from calibration: the running min/max of each layer's
  inputs over the calibration batches (llm-compressor's ``static_minmax``).
- Load: the stored tensors become the layer's buffers as they are; the shapes and dtypes the
  config implies are checked by the core before anything is read, the rest here.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import match_name, match_targets
from pydantic import ValidationError
from torch import nn

import quantplug

from .float8 import encode_float8
from .layers import CompressedTensorsLinear

_PACKED_ZP = ("group", "channel")  # strategies whose asymmetric zero points pack-quantized packs
#: llm-compressor's observers whose ranges quantize_module computes: the min/max of each weight (one
#: observation, so the memoryless, static and moving-average min/max agree) ...
_WEIGHT_OBSERVERS = (None, "memoryless_minmax", "static_minmax", "minmax")
#: ... and of static inputs over all calibration batches (calibrate)
_STATIC_INPUT_OBSERVERS = (None, "static_minmax")
#: the float dtypes compressed-tensors keeps scales in (``initialize_qparams``)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CompressedTensorsQuantizer(quantplug.Quantizer):
    def __init__(self, backend, config):
        super().__init__(backend, config)
        self._targets: OrderedDict[str, tuple[QuantizationScheme, str]] = OrderedDict()
        self._observers_checked = False

    def check_config(self) -> None:
        """Each group parsed by compressed-tensors' own ``QuantizationScheme`` (its validation)."""
        for name, group in self.config.config_groups.items():
            try:
                scheme = QuantizationScheme.model_validate(group)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise quantplug.ConfigError(
                    f"CompressedTensorsConfig: config_groups[{name!r}] is not a valid compressed-tensors scheme: "
                    f"{where}: {first.get('msg')}",
                    field="config_groups",
                    value=group,
                ) from None
            for target in scheme.targets:
                self._targets[target] = (scheme, group["format"])

    # -- which layers ------------------------------------------------------------------------

    def _ignored(self, name: str, module: nn.Module) -> str | None:
        for pattern in self.config.ignore:
            if match_name(name, pattern) or type(module).__name__ == pattern:
                return pattern
        return None

    def scheme_of(self, name: str, module: nn.Module) -> tuple[QuantizationScheme, str] | None:
        """The scheme and format compressed-tensors applies to ``name`` (None: left in full precision)."""
        return None if self._ignored(name, module) is not None else self._targeted(name, module)

    def _targeted(self, name: str, module: nn.Module) -> tuple[QuantizationScheme, str] | None:
        """The scheme of the most specific ``config_groups`` target naming ``module``, ``ignore`` aside."""
        matched = match_targets(name, module, list(self._targets))
        return self._targets[matched[0]] if matched else None

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        pattern = self._ignored(name, module)
        if pattern is not None:
            return f"in ignore ({pattern!r})"
        found = self._targeted(name, module)
        if found is None:
            return f"matches no config_groups target ({', '.join(self._targets)})"
        weights, inputs = found[0].weights, found[0].input_activations
        if inputs is not None and inputs.strategy == "group" and module.in_features % inputs.group_size:
            return (
                f"{module.in_features} inputs are not a multiple of the input group_size {inputs.group_size}"
            )
        if weights.strategy == "group" and module.in_features % weights.group_size:
            return (
                f"{module.in_features} inputs are not a multiple of group_size {weights.group_size} "
                f"(compressed-tensors' and vLLM's group layouts need whole groups)"
            )
        return None

    def needs_calibration(self) -> bool:
        return self.config.static_activations()

    # -- quantize ----------------------------------------------------------------------------

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        if not self._observers_checked:  # before the first layer changes
            self._check_observers()
            self._observers_checked = True
        scheme, fmt = self.scheme_of(name, module)
        args = scheme.weights
        weight = module.weight.detach()
        lo, hi = _ranges(weight, args.strategy, args.group_size, args.block_structure)
        scale, zero = calculate_qparams(lo, hi, args)
        state = {"weight": weight, "weight_scale": scale.to(weight.dtype)}
        if not args.symmetric:
            state["weight_zero_point"] = zero.to(torch.int8)
        compressed = CompressedTensorsLinear.compressor_of(fmt).compress(state, scheme)
        compressed.update(_activation_placeholders(scheme, weight.dtype, weight.device))
        bias = module.bias.detach() if module.bias is not None else None
        return CompressedTensorsLinear(scheme, fmt, module.in_features, module.out_features, compressed, bias)

    def _check_observers(self) -> None:
        """Quantizing computes weight ranges with min/max and static input ranges with the running
        min/max over all batches; a config naming another llm-compressor observer (``mse``, the
        moving-average ``minmax`` for inputs, ...) asks for ranges this plugin does not compute.
        Loading reads any observer: it only records how the stored scales were found."""
        for name, group in self.config.config_groups.items():
            scheme, _ = self._targets[group["targets"][0]]
            checks = [("weights", scheme.weights, _WEIGHT_OBSERVERS, "each weight's min/max")]
            if scheme.input_activations is not None and scheme.input_activations.dynamic is False:
                checks.append(
                    (
                        "input_activations",
                        scheme.input_activations,
                        _STATIC_INPUT_OBSERVERS,
                        "the min/max of the inputs over all calibration batches",
                    )
                )
            for where, args, allowed, how in checks:
                if args.observer not in allowed:
                    raise quantplug.ConfigError(
                        f"CompressedTensorsConfig: config_groups[{name!r}].{where}.observer={args.observer!r}: this "
                        f"plugin quantizes with {how} ({', '.join(a for a in allowed if a)}), not with "
                        f"{args.observer!r}; give one of those or null, or quantize with llm-compressor and load "
                        f"its checkpoint here (loading reads any observer)",
                        field="config_groups",
                        value=group,
                        allowed=[a for a in allowed if a is not None],
                    )

    def calibrate(self, model: nn.Module, batches: list) -> None:
        """Static input scales: the min/max of every static layer's inputs over all batches."""
        layers = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, CompressedTensorsLinear)
            and m.quantization_scheme.input_activations is not None
            and m.quantization_scheme.input_activations.dynamic is False
        }
        ranges: dict[str, list[torch.Tensor]] = {}

        def observer(name):
            def hook(_module, args):
                x = args[0].detach()
                lo, hi = x.amin().float(), x.amax().float()
                if name in ranges:
                    lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
                ranges[name] = [lo, hi]

            return hook

        hooks = [m.register_forward_pre_hook(observer(n)) for n, m in layers.items()]
        for m in layers.values():
            m.observing = True
        try:
            for batch in batches:
                quantplug.run_batch(model, batch)
        finally:
            for h in hooks:
                h.remove()
            for m in layers.values():
                m.observing = False
        for name, layer in layers.items():
            if name not in ranges:
                raise quantplug.PluginError(
                    f"quantplug-compressed-tensors: layer {name!r} received no calibration input (it did not run "
                    f"when the calibration batches did); add it to ignore"
                )
            lo, hi = ranges[name]
            args = layer.quantization_scheme.input_activations
            scale, zero = calculate_qparams(lo.reshape(1), hi.reshape(1), args)
            layer.input_scale = scale.to(layer.input_scale.dtype).reshape(layer.input_scale.shape)
            if hasattr(layer, "input_zero_point"):
                layer.input_zero_point = zero.to(layer.input_zero_point.dtype).reshape(
                    layer.input_zero_point.shape
                )

    # -- checkpoints -------------------------------------------------------------------------

    def _tensor_specs(self, name: str, module: nn.Linear) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Key -> (shape, dtype) of what compressed-tensors stores for ``module`` (floats in the
        layer's dtype; checked as 'any float' on load)."""
        scheme, fmt = self.scheme_of(name, module)
        w = scheme.weights
        out_f, in_f, dt = module.out_features, module.in_features, module.weight.dtype
        if w.strategy == "group":
            scale_shape = (out_f, math.ceil(in_f / w.group_size))
        elif w.strategy == "block":
            scale_shape = (math.ceil(out_f / w.block_structure[0]), math.ceil(in_f / w.block_structure[1]))
        elif w.strategy == "channel":
            scale_shape = (out_f, 1)
        else:
            scale_shape = (1,)
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"weight_scale": (scale_shape, dt)}
        if fmt == "pack-quantized":
            specs["weight_packed"] = ((out_f, math.ceil(in_f * w.num_bits / 32)), torch.int32)
            specs["weight_shape"] = ((2,), torch.int64)
            if not w.symmetric:
                if w.strategy in _PACKED_ZP:
                    specs["weight_zero_point"] = (
                        (math.ceil(out_f * w.num_bits / 32), scale_shape[1]),
                        torch.int32,
                    )
                else:
                    specs["weight_zero_point"] = (scale_shape, torch.int8)
        else:
            specs["weight"] = ((out_f, in_f), torch.float8_e4m3fn if w.type == "float" else torch.int8)
            if not w.symmetric:
                specs["weight_zero_point"] = (scale_shape, torch.int8)
        for key, t in _activation_placeholders(scheme, dt, "meta").items():
            specs[key] = (tuple(t.shape), t.dtype)
        if module.bias is not None:
            specs["bias"] = ((out_f,), dt)
        return specs

    def offload_refusal(self) -> str | None:
        return None  # CompressedTensorsLinear is its buffers, read on every forward

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        scheme, fmt = self.scheme_of(name, module)
        tensors = {
            k: torch.empty(shape, dtype=dtype, device="meta")
            for k, (shape, dtype) in self._tensor_specs(name, module).items()
        }
        bias = tensors.pop("bias", None)
        return CompressedTensorsLinear(scheme, fmt, module.in_features, module.out_features, tensors, bias)

    def expected_tensors(self, name: str, module: nn.Linear):
        # float tensors: checked in load_module (the layer's dtype, or float32)
        return {
            k: (shape, dtype if not dtype.is_floating_point or dtype == torch.float8_e4m3fn else None)
            for k, (shape, dtype) in self._tensor_specs(name, module).items()
        }

    # -- export ------------------------------------------------------------------------------

    def integer_grid(self, name: str, qmodule: nn.Module):
        if not isinstance(qmodule, CompressedTensorsLinear):
            return f"{type(qmodule).__name__} is not a compressed-tensors layer"
        return _grid_of(qmodule)

    def encode_float8_grid(self, name: str, module: nn.Linear, grid) -> nn.Module:
        return encode_float8(self, name, module, grid)

    def encode_grid(self, name: str, module: nn.Linear, grid) -> nn.Module:
        scheme, fmt = self.scheme_of(name, module)
        w = scheme.weights
        layout = grid.layout
        if fmt != "pack-quantized" or w.num_bits != layout.bits or w.symmetric != layout.symmetric:
            raise quantplug.PluginError(
                f"export: {name}'s scheme ({fmt}, {w}) does not fit its grid ({layout})"
            )
        dtype = module.weight.dtype
        scale = grid.scale.to(dtype)
        if not torch.equal(scale.to(grid.scale.dtype), grid.scale):
            raise quantplug.ConfigError(
                f"export: {name}'s scales are {grid.scale.dtype} values that {dtype} (the model's dtype, which "
                f"compressed-tensors stores scales in) cannot hold exactly; re-save the source model in float32 "
                f"first (quantplug.load(..., dtype=torch.float32), then quantplug.save)",
                field="dtype",
                value=str(dtype),
            )
        tensors = {
            "weight_packed": pack_to_int32(grid.codes, grid.bits),
            "weight_shape": torch.tensor([layout.out_features, layout.in_features]),
            "weight_scale": scale.contiguous(),
        }
        if grid.zero_point is not None:
            tensors["weight_zero_point"] = pack_to_int32(
                grid.zero_point, grid.bits, packed_dim=0
            ).contiguous()
        bias = grid.bias.detach().to(dtype) if grid.bias is not None else None
        return CompressedTensorsLinear(scheme, fmt, layout.in_features, layout.out_features, tensors, bias)

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        tensors = dict(tensors)
        for key in ("weight_scale", "input_scale", "bias"):
            t = tensors.get(key)
            if t is None:
                continue
            # compressed-tensors keeps scales in the float dtype it observed them in (auto-round writes
            # float16 ones for a bfloat16 model) and its reader casts them to the model's dtype
            if t.dtype not in _FLOAT_DTYPES:
                raise quantplug.CheckpointError(
                    f"{name}.{key}: stored as {t.dtype}; compressed-tensors reads float scales and biases "
                    f"({', '.join(map(str, _FLOAT_DTYPES))}) only, so this tensor is not one it wrote for a "
                    f"{self.scheme_of(name, module)[1]} layer"
                )
            tensors[key] = t.to(module.weight.dtype)
        shape = tensors.get("weight_shape")
        if shape is not None and shape.tolist() != [module.out_features, module.in_features]:
            raise quantplug.CheckpointError(
                f"{name}.weight_shape: says {shape.tolist()}, but the model's layer is "
                f"[{module.out_features}, {module.in_features}]: the checkpoint is not of this model"
            )
        scheme, fmt = self.scheme_of(name, module)
        bias = tensors.pop("bias", None)
        return CompressedTensorsLinear(scheme, fmt, module.in_features, module.out_features, tensors, bias)


def _grid_of(layer: CompressedTensorsLinear) -> quantplug.IntegerGrid | str:
    scheme = layer.quantization_scheme
    w = scheme.weights
    if scheme.input_activations is not None:
        return (
            f"its inputs are quantized too ({scheme.input_activations.type}{scheme.input_activations.num_bits}): "
            f"a weight-only grid would change what it computes"
        )
    if w.type != "int":
        return f"its weights are {w.type}{w.num_bits} (FP8), not integers"
    out_f, in_f = layer.out_features, layer.in_features
    scale = layer.weight_scale
    if w.strategy == "tensor":
        scale = scale.reshape(1, 1).expand(out_f, 1).contiguous()
    group_size = in_f if w.strategy != "group" else w.group_size
    if in_f % group_size:
        return f"{in_f} inputs are not a multiple of its group size {group_size}"
    if layer.format == "pack-quantized":
        codes = unpack_from_int32(layer.weight_packed, w.num_bits, torch.Size([out_f, in_f]))
        zero = getattr(layer, "weight_zero_point", None)
        if zero is not None and w.strategy in _PACKED_ZP:
            zero = unpack_from_int32(zero, w.num_bits, torch.Size([out_f, scale.shape[1]]), packed_dim=0)
    else:
        codes, zero = layer.weight, getattr(layer, "weight_zero_point", None)
    if zero is not None:
        zero = zero.to(torch.int8).reshape(-1, 1).expand(out_f, scale.shape[1]) if zero.numel() == 1 else zero
        zero = zero.to(torch.int8).contiguous()
    bias = layer.bias.detach() if layer.bias is not None else None
    return quantplug.IntegerGrid(codes.to(torch.int8), scale, zero, w.num_bits, group_size, bias)


def _ranges(
    weight: torch.Tensor, strategy: str, group_size: int | None, block: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``weight`` per tensor ([1]), per output channel ([out, 1]), per group
    ([out, groups]) or per tile ([ceil(out / bm), ceil(in / bn)], zero-padded as compressed-tensors
    pads): the shapes compressed-tensors gives its scales."""
    if strategy == "block":
        (bm, bn), (rows, cols) = block, weight.shape
        padded = torch.nn.functional.pad(weight, (0, -cols % bn, 0, -rows % bm))
        tiles = padded.reshape(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn)
        return tiles.amin((1, 3)), tiles.amax((1, 3))
    if strategy == "group":
        grouped = weight.reshape(weight.shape[0], -1, group_size)
        return grouped.amin(-1), grouped.amax(-1)
    if strategy == "channel":
        return weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    return weight.amin().reshape(1), weight.amax().reshape(1)


def _activation_placeholders(
    scheme: QuantizationScheme, dtype: torch.dtype, device
) -> dict[str, torch.Tensor]:
    """``input_scale`` (and ``input_zero_point`` when asymmetric) of a static-activation scheme,
    filled by calibration (or by the checkpoint on load)."""
    inputs = scheme.input_activations
    if inputs is None or inputs.dynamic is not False:
        return {}
    out = {"input_scale": torch.ones(1, dtype=dtype, device=device)}
    if not inputs.symmetric:
        out["input_zero_point"] = torch.zeros(1, dtype=torch.int8, device=device)
    return out
