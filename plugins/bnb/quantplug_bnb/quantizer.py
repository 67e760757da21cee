"""``BnbQuantizer``: bitsandbytes' own ``Linear8bitLt`` / ``Linear4bit`` (``Int8Params`` /
``Params4bit``), quantized by bitsandbytes' own functions; nothing is reimplemented here.

A layer's checkpoint tensors are what these modules write in ``state_dict()``, which is exactly what
Transformers' bitsandbytes integration saves and loads (the README lists them), so checkpoints move
both ways between quantplug and ``from_pretrained`` / ``save_pretrained``. Quantizing a layer is
bitsandbytes' quantization followed by the rebuild that loading does (``Params4bit.from_prequantized``,
as Transformers loads). ``empty_module`` quantizes the meta-device layer that way, so the keys,
shapes and dtypes a checkpoint must hold are read off bitsandbytes' own module.
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn

import quantplug

from .config import BnbConfig

#: attribute of a quantized Linear4bit: its quant state's checkpoint tensors, recorded before any
#: CPU repacking (see module_tensors)
_SAVED_STATE = "quantplug_quant_state"
#: 4-bit entries whose sizes the stored quant state sets (its block size, its JSON), checked by load_module
_STATE_SIZED = ("weight.absmax", "weight.nested_absmax", "weight.quant_state.")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _check_absmax(name: str, absmax: torch.Tensor, nested: bool) -> None:
    """absmax is float32 (uint8 with double quantization). A 2-D bfloat16 one is bitsandbytes' CPU
    kernel layout: saved from a model that had run a forward on an AVX512-BF16 CPU (bitsandbytes
    0.50 repacks 4-bit layers on the first eval forward and its state_dict() then writes the repacked
    scales, rounded to bfloat16); nobody can read such a file back faithfully."""
    expected = torch.uint8 if nested else torch.float32
    if absmax.dtype == expected:
        return
    if absmax.dtype == torch.bfloat16 and absmax.dim() == 2:
        raise quantplug.CheckpointError(
            f"{name}.weight.absmax is a {list(absmax.shape)} bfloat16 tensor, not the [{absmax.numel()}] "
            f"{expected} bitsandbytes stores: this 4-bit checkpoint was saved after a forward pass on a CPU "
            f"with AVX512-BF16, where bitsandbytes repacks 4-bit layers for its CPU kernel and then saves "
            f"the repacked, bfloat16-rounded scales (a bitsandbytes 0.50 bug; Transformers' save_pretrained "
            f"writes them too). The original scales are lost, so it cannot be loaded faithfully: quantize the "
            f"full-precision model again (quantplug.save writes the original quant state even after forwards)"
        )
    raise quantplug.CheckpointError(f"{name}.weight.absmax has dtype {absmax.dtype}, expected {expected}")


def _state_tensors(state: bnb_functional.QuantState) -> dict[str, torch.Tensor]:
    """A 4-bit layer's quant state as its checkpoint entries (``QuantState.as_dict(packed=True)``)."""
    if state.nested and state.offset.is_meta:
        state.offset = torch.zeros(())  # its value goes into the JSON; a meta layer has none
    return {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}


def _unpacked_codes(name: str, qmodule: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A CPU-repacked 4-bit layer's codes, un-permuted by bitsandbytes' own inverse (exact, run on
    a copy of the quant state so the live layer is untouched), and the quant state tensors
    recorded when quantplug built the layer (the repack rounds the block scales to bfloat16)."""
    saved = getattr(qmodule, _SAVED_STATE, None)
    if saved is None:
        raise quantplug.PluginError(
            f"{name}: this 4-bit layer was repacked for bitsandbytes' CPU kernel by a forward pass, and "
            f"its original quant state was not recorded (it was not built by quantplug-bnb), so it "
            f"cannot be saved faithfully; quantize or load the model with quantplug and save before or after forwards"
        )
    state = copy.copy(qmodule.weight.quant_state)
    state.original_nested = False  # skip re-quantizing the (bf16) scales: we have the originals
    weight, _ = bnb_functional._convert_weight_packed_for_cpu_inverse(qmodule.weight.data, state)
    return weight, saved


def _is_repacked(qmodule: nn.Module) -> bool:
    return bool(getattr(getattr(qmodule.weight, "quant_state", None), "packing_format_for_cpu", False))


def _unpack(qmodule: nn.Module) -> None:
    """Put a CPU-repacked 4-bit layer back in bitsandbytes' ordinary layout, exactly as quantplug
    built it (codes and the recorded quant state); a layer that is not repacked is left alone."""
    if not _is_repacked(qmodule):
        return
    weight, saved = _unpacked_codes(type(qmodule).__name__, qmodule)
    stats = {k: v.clone() for k, v in saved.items()}  # from_dict pops entries; the record stays intact
    state = bnb_functional.QuantState.from_dict(stats, device=weight.device)
    qmodule.weight.data = weight
    qmodule.weight.quant_state = qmodule.quant_state = state


def _unpack_when_gradients_flow(qmodule: nn.Module, args: tuple) -> None:
    """Forward pre-hook of quantplug's 4-bit layers. bitsandbytes repacks a layer for its CPU
    kernel on an inference forward (eval mode, input without grad) and then always runs that
    kernel, which has no backward: after one evaluation, training would get no gradient through
    the layer (so none reaches LoRA adapters before it). Where bitsandbytes would not repack (a
    training-mode layer, or an input that requires grad) the layer is unpacked first, so the
    differentiable path runs; the next inference forward repacks it again."""
    x = args[0] if args else None
    if _is_repacked(qmodule) and (qmodule.training or (isinstance(x, torch.Tensor) and x.requires_grad)):
        _unpack(qmodule)


def _unpack_before_state_dict(qmodule: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook of quantplug's 4-bit layers: bitsandbytes' own ``_save_to_state_dict``
    on a repacked layer writes its bfloat16-rounded scales and leaves the layer altered; unpacking
    exactly first makes ``state_dict()`` (and Transformers' ``save_pretrained``) write the layer
    as quantized."""
    _unpack(qmodule)


class BnbQuantizer(quantplug.Quantizer):
    config: BnbConfig

    def model_attributes(self) -> dict[str, object]:
        """What Transformers sets on a bitsandbytes model, and PEFT reads to wrap these layers in its
        bitsandbytes LoRA layers (a generic LoRA wrapper would not) and to prepare k-bit training."""
        return {
            "is_loaded_in_4bit": bool(self.config.load_in_4bit),
            "is_loaded_in_8bit": bool(self.config.load_in_8bit),
            "quantization_method": "bitsandbytes",
        }

    def validate_environment(self, device: torch.device | str) -> None:
        super().validate_environment(device)
        kind = str(device).split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise quantplug.BackendUnavailableError(
                f"backend 'bitsandbytes': device {str(device)!r} requested, but torch {torch.__version__} "
                f"sees no CUDA device; use device='cpu' (int8, nf4 and fp4 all run on CPU) or a CUDA build of torch"
            )

    # -- quantizing: bitsandbytes' quantization, then the rebuild that loading does ---------------

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        q = self.load_module(name, module, self._quantized_tensors(module))
        # A new module starts in training mode; bitsandbytes' int8 matmul treats outliers differently
        # when training, so follow the layer it replaces (an eval() model stays in eval).
        return q.train(module.training)

    def offload_refusal(self) -> str | None:
        return (
            "bitsandbytes keeps each layer's quantization state (Params4bit.quant_state, Int8Params.SCB) "
            "beside its weight tensor, outside what accelerate writes out and puts back (Transformers "
            "refuses to offload bitsandbytes layers too)"
        )

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return self.quantize_module(name, module)  # bitsandbytes' functions run on meta tensors too

    def _quantized_tensors(self, module: nn.Linear) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of ``module``, quantized as ``Int8Params`` / ``Params4bit`` do it
        when moved to a device."""
        c, weight = self.config, module.weight.detach()
        if c.load_in_8bit:
            cb, scb, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
            tensors = {"weight": cb, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}
        else:
            data, state = bnb_functional.quantize_4bit(
                weight.contiguous(),
                compress_statistics=c.bnb_4bit_use_double_quant,
                quant_type=c.bnb_4bit_quant_type,
                quant_storage=_dtype(c.bnb_4bit_quant_storage),
            )
            tensors = {"weight": data, **_state_tensors(state)}
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return tensors

    # -- checkpoints ---------------------------------------------------------------------------

    def expected_tensors(
        self, name: str, module: nn.Linear
    ) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]]:
        # read off empty_module (the default), except: the bias may be stored in any float dtype
        # (it is cast), the stored quant state sets the sizes of its own entries, and absmax's
        # dtype is checked by load_module (which recognises bitsandbytes' CPU-repacked layout)
        spec = super().expected_tensors(name, module)
        for key, (shape, dtype) in spec.items():
            if key == "bias":
                spec[key] = (shape, None)
            elif key == "weight.absmax":
                spec[key] = (None, None)
            elif key.startswith(_STATE_SIZED):
                spec[key] = (None, dtype)
        return spec

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        qs = getattr(qmodule.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            return self._unrepacked_4bit_tensors(name, qmodule)
        # bitsandbytes' own _save_to_state_dict writes Transformers' layout; plain tensors, detached.
        return {k: v.detach().as_subclass(torch.Tensor) for k, v in qmodule.state_dict().items()}

    def _unrepacked_4bit_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer on its first eval
        # forward and keeps the block scales as transposed bfloat16. Write the quant state recorded
        # when the layer was built and the codes un-permuted, leaving the live layer repacked.
        weight, saved = _unpacked_codes(name, qmodule)
        bias = {} if qmodule.bias is None else {"bias": qmodule.bias.detach()}
        return {"weight": weight, **bias, **saved}

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        if self.config.load_in_4bit:
            q = self._load_4bit(name, module, tensors)
        else:
            q = self._load_8bit(name, module, tensors)
        if tensors.get("bias") is not None:
            q.bias = nn.Parameter(tensors["bias"].detach().clone(), requires_grad=False)
        return q.requires_grad_(False)

    def _load_4bit(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        c = self.config
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=_dtype(c.bnb_4bit_compute_dtype),
            compress_statistics=c.bnb_4bit_use_double_quant,
            quant_type=c.bnb_4bit_quant_type,
            quant_storage=_dtype(c.bnb_4bit_quant_storage),
            device="meta",
        )
        data = tensors["weight"]
        _check_absmax(name, tensors["weight.absmax"], c.bnb_4bit_use_double_quant)
        stats = {k: v for k, v in tensors.items() if k.startswith("weight.")}
        try:
            weight = bnb.nn.Params4bit.from_prequantized(
                data=data, quantized_stats=stats, requires_grad=False, device=data.device, module=q
            )
        except Exception as exc:  # bitsandbytes raises ValueError / AssertionError / JSON errors here
            raise quantplug.CheckpointError(
                f"{name}: bitsandbytes cannot rebuild the 4-bit quant state from the checkpoint "
                f"({type(exc).__name__}: {exc}); the file is damaged or not a bitsandbytes checkpoint"
            ) from None
        qs = weight.quant_state
        problems = []
        if qs.quant_type != c.bnb_4bit_quant_type:
            problems.append(f"quant type {qs.quant_type!r}, config says {c.bnb_4bit_quant_type!r}")
        if tuple(qs.shape) != (module.out_features, module.in_features):
            problems.append(
                f"weight shape {list(qs.shape)}, the layer is {[module.out_features, module.in_features]}"
            )
        blocks = -(-module.out_features * module.in_features // qs.blocksize)
        # a short absmax would load, then fail (or read past its end) in forward
        if qs.absmax.numel() != blocks:
            problems.append(
                f"{name}.weight.absmax has shape [{qs.absmax.numel()}]; {blocks} blocks of {qs.blocksize} need [{blocks}]"
            )
        if qs.nested and qs.state2 is not None:
            nested = -(-blocks // qs.state2.blocksize)
            if qs.state2.absmax.numel() != nested:
                problems.append(
                    f"{name}.weight.nested_absmax has shape [{qs.state2.absmax.numel()}]; {blocks} absmax values "
                    f"in blocks of {qs.state2.blocksize} need [{nested}]"
                )
        if bool(qs.nested) != c.bnb_4bit_use_double_quant:
            problems.append(
                f"double quant {bool(qs.nested)}, config says bnb_4bit_use_double_quant={c.bnb_4bit_use_double_quant}"
            )
        if problems:
            raise quantplug.CheckpointError(
                f"{name}: the stored bitsandbytes quant state does not match: {'; '.join(problems)}"
            )
        q.weight = weight
        setattr(q, _SAVED_STATE, _state_tensors(qs))  # (small: ~0.5 bit per weight)
        q.register_forward_pre_hook(_unpack_when_gradients_flow)
        q.register_state_dict_pre_hook(_unpack_before_state_dict)
        return q

    def _load_8bit(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        fmt = int(tensors["weight_format"].item())
        if fmt != 0:
            raise quantplug.CheckpointError(
                f"{name}.weight_format is {fmt}; bitsandbytes {bnb.__version__} reads only 0 (row-major int8)"
            )
        q = bnb.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            has_fp16_weights=False,
            threshold=self.config.llm_int8_threshold,
            device="meta",
        )
        data = tensors["weight"]
        q.weight = bnb.nn.Int8Params(
            data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=tensors["SCB"]
        )
        return q
