"""``BnbQuantizer``: wraps bitsandbytes' own ``Linear8bitLt`` / ``Linear4bit`` (``Int8Params`` /
``Params4bit``) and kernels; nothing is reimplemented here.

The checkpoint tensors of a layer are exactly what Transformers' bitsandbytes integration writes
(the modules' own ``state_dict()``), so checkpoints move both ways between quantplug and
``from_pretrained`` / ``save_pretrained``:

    8-bit   weight int8 [out, in], SCB float32 [out] (row scales), weight_format uint8 [] (0 = row), bias
    4-bit   weight <quant_storage> [ceil(out*in/2) / itemsize, 1] (packed codes), weight.absmax
            (float32, or uint8 with double quant, one per block of 64), weight.quant_map float32 [16],
            weight.nested_absmax / weight.nested_quant_map (double quant only),
            weight.quant_state.bitsandbytes__<nf4|fp4> (uint8: bitsandbytes' JSON-packed quant state:
            block size, dtype, shape), bias
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn

import quantplug

from .config import BnbConfig, transformers_skips

_QUANT_MAP_SIZE = 16  # 4-bit code book
_NESTED_QUANT_MAP_SIZE = 256  # 8-bit dynamic code book of double quant
#: attribute of a quantized Linear4bit: its serialized quant state, recorded before any CPU repacking
_SAVED_STATE = "quantplug_quant_state"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class BnbQuantizer(quantplug.Quantizer):
    config: BnbConfig

    # -- environment ---------------------------------------------------------------------------

    def validate_environment(self, device: torch.device | str) -> None:
        super().validate_environment(device)
        kind = str(device).split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise quantplug.BackendUnavailableError(
                f"backend 'bitsandbytes': device {str(device)!r} requested, but torch {torch.__version__} "
                f"sees no CUDA device; use device='cpu' (int8, nf4 and fp4 all run on CPU) or a CUDA build of torch"
            )

    def skip_reason(self, name: str, module: nn.Linear) -> str | None:
        # quantplug's plan() already skips what its own matching finds; also skip what Transformers'
        # matching of the same list finds, so both load the same checkpoint layout.
        pattern = transformers_skips(name, self.config.llm_int8_skip_modules)
        if pattern is not None:
            return f"matches llm_int8_skip_modules pattern {pattern!r} (as Transformers matches it)"
        return None

    # -- building modules ----------------------------------------------------------------------

    def _linear4bit(self, module: nn.Linear) -> bnb.nn.Linear4bit:
        c = self.config
        return bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=_dtype(c.bnb_4bit_compute_dtype),
            compress_statistics=c.bnb_4bit_use_double_quant,
            quant_type=c.bnb_4bit_quant_type,
            quant_storage=_dtype(c.bnb_4bit_quant_storage),
            device="meta",
        )

    def _linear8bit(self, module: nn.Linear) -> bnb.nn.Linear8bitLt:
        return bnb.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            has_fp16_weights=False,
            threshold=self.config.llm_int8_threshold,
            device="meta",
        )

    @staticmethod
    def _set_bias(qmodule: nn.Module, bias: torch.Tensor | None) -> None:
        if bias is not None:
            qmodule.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        device = module.weight.device
        weight = module.weight.detach()
        if self.config.load_in_4bit:
            q = self._linear4bit(module)
            c = self.config
            # Params4bit quantizes with bitsandbytes' quantize_4bit when moved to a device.
            q.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=c.bnb_4bit_use_double_quant,
                quant_type=c.bnb_4bit_quant_type,
                quant_storage=_dtype(c.bnb_4bit_quant_storage),
                module=q,
            ).to(device)
            self._record_quant_state(q)
        else:
            q = self._linear8bit(module)
            # Int8Params quantizes (int8_vectorwise_quant) when moved from the CPU to a device.
            q.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(
                device
            )
        self._set_bias(q, module.bias)
        q.requires_grad_(False)
        # A new module starts in training mode; bitsandbytes' int8 matmul treats outliers differently
        # when training, so follow the layer it replaces (an eval() model stays in eval).
        q.train(module.training)
        return q

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        q = self._linear4bit(module) if self.config.load_in_4bit else self._linear8bit(module)
        q.requires_grad_(False)
        return q

    # -- checkpoints ---------------------------------------------------------------------------

    @staticmethod
    def _record_quant_state(q: bnb.nn.Linear4bit) -> None:
        """Keep the serialized quant state (small: ~0.5 bit per weight) as it is before the first
        forward. On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer on its first
        eval forward and stores the block scales as transposed bfloat16; its state_dict() then
        writes those (and corrupts the layer for later forwards), so module_tensors must not call
        it on a repacked layer."""
        setattr(q, _SAVED_STATE, dict(q.weight.quant_state.as_dict(packed=True)))

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        qs = getattr(qmodule.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            return self._unrepacked_4bit_tensors(name, qmodule)
        # bitsandbytes' own _save_to_state_dict writes Transformers' layout; plain tensors, detached.
        return {k: v.detach().as_subclass(torch.Tensor) for k, v in qmodule.state_dict().items()}

    def _unrepacked_4bit_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        saved = getattr(qmodule, _SAVED_STATE, None)
        if saved is None:
            raise quantplug.PluginError(
                f"{name}: this 4-bit layer was repacked for bitsandbytes' CPU kernel by a forward pass, and "
                f"its original quant state was not recorded (it was not built by quantplug-bnb), so it "
                f"cannot be saved faithfully; quantize or load the model with quantplug and save before or after forwards"
            )
        # bitsandbytes' own inverse of the weight repacking (exact: a bit permutation), run on a copy
        # of the quant state so the live layer keeps working; the scales come from the recorded state.
        state = copy.copy(qmodule.weight.quant_state)
        state.original_nested = False  # skip re-quantizing the (bf16) scales: we have the originals
        weight, _ = bnb_functional._convert_weight_packed_for_cpu_inverse(qmodule.weight.data, state)
        out = {"weight": weight}
        if qmodule.bias is not None:
            out["bias"] = qmodule.bias.detach()
        out.update({f"weight.{k}": v for k, v in saved.items()})
        return out

    def expected_tensors(
        self, name: str, module: nn.Linear
    ) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]]:
        c = self.config
        out_f, in_f = module.out_features, module.in_features
        spec: dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]] = {}
        if c.load_in_4bit:
            storage = _dtype(c.bnb_4bit_quant_storage)
            itemsize = torch.empty((), dtype=storage).element_size()
            spec["weight"] = (((out_f * in_f + 1) // (2 * itemsize), 1), storage)
            spec["weight.absmax"] = (None, torch.uint8 if c.bnb_4bit_use_double_quant else torch.float32)
            spec["weight.quant_map"] = ((_QUANT_MAP_SIZE,), torch.float32)
            if c.bnb_4bit_use_double_quant:
                spec["weight.nested_absmax"] = (None, torch.float32)
                spec["weight.nested_quant_map"] = ((_NESTED_QUANT_MAP_SIZE,), torch.float32)
            spec[f"weight.quant_state.bitsandbytes__{c.bnb_4bit_quant_type}"] = (None, torch.uint8)
        else:
            spec["weight"] = ((out_f, in_f), torch.int8)
            spec["SCB"] = ((out_f,), torch.float32)
            spec["weight_format"] = ((), torch.uint8)
        if module.bias is not None:
            spec["bias"] = ((out_f,), None)
        return spec

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        if self.config.load_in_4bit:
            q = self._load_4bit(name, module, tensors)
        else:
            q = self._load_8bit(name, module, tensors)
        self._set_bias(q, tensors.get("bias"))
        q.requires_grad_(False)
        return q

    def _load_4bit(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        c = self.config
        q = self._linear4bit(module)
        data = tensors["weight"]
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
        self._record_quant_state(q)
        return q

    def _load_8bit(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        fmt = int(tensors["weight_format"].item())
        if fmt != 0:
            raise quantplug.CheckpointError(
                f"{name}.weight_format is {fmt}; bitsandbytes {bnb.__version__} reads only 0 (row-major int8)"
            )
        q = self._linear8bit(module)
        data = tensors["weight"]
        q.weight = bnb.nn.Int8Params(
            data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=tensors["SCB"]
        )
        return q
