"""``AutoRoundQuantizer``: runs auto-round's ``AutoRound`` on the model in ``calibrate`` and puts auto-round's
packed ``QuantLinear`` modules (its inference kernels: auto-round-lib's on CPU) in place of the layers chosen.

``quantize_module`` returns the layer unchanged and records its name; ``calibrate`` checks the
calibration data (a ``ConfigError`` before the model is touched), runs AutoRound with those layers
quantized and every other Linear kept at 16 bits, packs them with auto-round's exporter (the
``auto_round`` checkpoint format: ``qweight`` / ``qzeros`` / ``scales`` per layer) and rebuilds
each as the inference module ``load_module`` builds from a checkpoint, so a quantized model and a
loaded one compute the same.

Checkpoint tensors are exactly auto-round's (read off the packing ``QuantLinear`` built on the meta
device); the inference module keeps them for ``module_tensors`` (auto-round-lib's kernel repacks
its weights on load, so they are not its ``state_dict``); ``GridMixin`` (grid.py) reads them as an integer grid."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import types
import warnings
from typing import Any

import torch
from auto_round import AutoRound
from auto_round.export.export_to_autoround.export import dynamic_import_quant_linear_for_packing, pack_layer
from auto_round.export.export_to_awq.export import pack_layer as pack_awq_layer
from auto_round.export.export_to_awq.utils import WQLinear_GEMM
from auto_round.inference.backend import find_backend, get_layer_backend
from auto_round.inference.convert_model import _create_quant_layer
from auto_round.utils.model import get_block_names
from torch import nn

import quantplug

from .calibration import Wrapped, count_samples, prepare_samples, restored, set_module, shallow_copy
from .grid import GridMixin
from .moe import keep_unfused_experts

#: attribute on an inference module holding the checkpoint tensors it was built from
CHECKPOINT_ATTR = "_quantplug_checkpoint"


#: auto-round keeps state shared between AutoRound instances while it tunes (two tunings in two threads
#: fail with "'LLMCalibrator' object has no attribute 'last_cache_name'"): one tuning at a time. The
#: same lock serializes auto-round-lib's kernel calls, which break when torch runs one thread (see
#: ``_never_single_threaded``) -- and AutoRound sets torch's process-wide thread count to cores // 2
#: (1 on a 2-core machine) while it tunes, so a kernel call in another thread must not overlap it.
_AUTO_ROUND = threading.RLock()


class AutoRoundQuantizer(GridMixin, quantplug.Quantizer):
    def __init__(self, backend, config):
        super().__init__(backend, config)
        self._pending: dict[int, str] = {}
        self._device = torch.device("cpu")

    # -- checks -------------------------------------------------------------------------------

    def check_config(self) -> None:
        c = self.config
        if c.backend != "auto" and find_backend(c.backend) is None:
            raise quantplug.ConfigError(
                f"AutoRoundConfig: backend={c.backend!r} is not an auto-round inference backend; allowed: "
                f"'auto' or a name auto-round knows (auto_round_kernel, torch, gptqmodel, tritonv2, ...)",
                field="backend",
                value=c.backend,
                allowed="'auto' or an auto-round backend name",
            )

    def validate_environment(self, device) -> None:
        super().validate_environment(device)
        self._device = torch.device(device)

    def skip_reason(self, name: str, module: nn.Linear) -> str | None:
        c = self.config
        listed = c.layer_bits(name)
        if listed is not None and listed >= 16:
            return f"auto-round's extra_config keeps it at {listed} bits"
        blocks = c.block_names()
        if (
            blocks is not None
            and listed is None
            and not any(name == b or name.startswith(b + ".") for b in blocks)
        ):
            return f"outside block_name_to_quantize ({', '.join(blocks)}), which auto-round quantizes"
        scheme = c.layer_scheme(name)
        bits, group = scheme["bits"], scheme["group_size"]
        in_f, out_f = module.in_features, module.out_features
        if (in_f * bits) % 32 or (out_f * bits) % 32:
            return (
                f"auto-round packs {bits}-bit weights into int32 words: in and out features times bits must be "
                f"multiples of 32"
            )
        if group != -1 and in_f % group:
            return f"in_features {in_f} is not a multiple of group_size {group}"
        return None

    # -- quantize -----------------------------------------------------------------------------

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        self._pending[id(module)] = name
        return module  # replaced in calibrate, once AutoRound has tuned it

    def calibrate(self, model: nn.Module, batches: list[Any]) -> None:
        pending = {n: m for n, m in model.named_modules() if self._pending.get(id(m)) == n}
        self._pending.clear()
        if not pending:
            return
        device = next(model.parameters()).device
        blocks = _blocks(model)
        transformers_path = bool(blocks)
        samples, seqlen = prepare_samples(self.config, batches, transformers_path)
        nsamples = self.config.nsamples or sum(count_samples(s) for s in samples)
        metas = {
            n: nn.Linear(
                m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=m.weight.dtype
            )
            for n, m in pending.items()
        }
        for name, m in pending.items():  # AutoRound recasts and then releases the layers it packs:
            set_module(model, name, shallow_copy(m))  # give it copies, never the caller's modules
        others = {
            n: {"bits": 16} for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in pending
        }
        with restored(model, exclude=set(pending)):
            target = model if transformers_path else Wrapped(model)
            prefix = "" if transformers_path else "blocks.0."
            layer_config = {prefix + n: v for n, v in others.items()}
            for n in pending:
                layer_config[prefix + n] = self._layer_scheme(n)
            self._run(
                target,
                samples,
                seqlen,
                nsamples,
                layer_config,
                device,
                batch_size=None if transformers_path else 1,
            )
            done = {}
            for name in pending:
                # auto-round's own packing (what quantize_and_save(format="auto_round") writes)
                pack = pack_awq_layer if _is_awq(self.config.packing) else pack_layer
                pack(prefix + name, target, self.config.packing, device)
                qmodule = target.get_submodule(prefix + name)
                if isinstance(qmodule, nn.Linear):
                    raise quantplug.PluginError(
                        f"auto-round left {name} unquantized (it found no calibrated inputs for it); "
                        f"add it to modules_to_not_convert"
                    )
                done[name] = {k: v.detach() for k, v in qmodule.state_dict().items()}
        if transformers_path:
            self._record_layers_outside_blocks(list(pending), blocks)
        self._device = device
        for name, tensors in done.items():
            qmodule = self.load_module(name, metas[name], tensors)
            qmodule.train(pending[name].training)
            set_module(model, name, qmodule)

    def _record_layers_outside_blocks(self, names: list[str], blocks: list) -> None:
        """As auto-round's exporter does: layers quantized outside the model's blocks (e.g. the head,
        with modules_to_not_convert=[]) go into ``extra_config``, and the blocks into
        ``block_name_to_quantize``, so the saved config tells auto-round's loader (Transformers)
        which layers hold packed tensors. Nothing changes when every layer is in a block."""
        prefixes = [os.path.commonprefix(list(b)).rstrip(".") for b in blocks if b]
        outside = [n for n in names if not any(n == p or n.startswith(p + ".") for p in prefixes)]
        if not outside:
            return
        c = self.config
        extra = dict(c.extra_config or {})
        for n in outside:
            extra.setdefault(n, self._layer_scheme(n))
        named = c.block_name_to_quantize or c.to_quant_block_names or ",".join(prefixes)
        self.config = dataclasses.replace(c, extra_config=extra, block_name_to_quantize=named)

    def _layer_scheme(self, name: str) -> dict[str, Any]:
        return {**self.config.layer_scheme(name), "data_type": "int"}

    def _run(self, model, samples, seqlen, nsamples, layer_config, device, batch_size=None) -> None:
        c = self.config
        kwargs = dict(
            bits=c.bits,
            group_size=c.group_size,
            sym=c.sym,
            iters=c.iters,
            nsamples=nsamples,
            seqlen=seqlen,
            batch_size=batch_size or min(c.batch_size, nsamples),
            gradient_accumulate_steps=c.gradient_accumulate_steps,
            enable_minmax_tuning=c.enable_minmax_tuning,
            enable_quanted_input=c.enable_quanted_input,
            enable_norm_bias_tuning=c.enable_norm_bias_tuning,
            low_gpu_mem_usage=c.low_gpu_mem_usage,
            amp=c.amp,
            seed=c.seed,
            dataset=samples,
            layer_config=layer_config,
            device_map=str(device) if device.type != "cpu" else "cpu",
            enable_torch_compile=False,  # on by default on Linux CPU: many minutes of compiling
        )
        if c.lr is not None:
            kwargs["lr"] = c.lr
        if c.minmax_lr is not None:
            kwargs["minmax_lr"] = c.minmax_lr
        # No tokenizer: the dataset is token ids already. AutoRound insists on an object and asks it
        # only for the pad token (left out of the loss); the model's, else None (padding is then
        # detected as trailing repeated tokens, auto-round's rule).
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad = pad if isinstance(pad, int) else None
        tokenizer = types.SimpleNamespace(pad_token_id=pad, pad_token=None if pad is None else str(pad))
        threads = torch.get_num_threads()  # AutoRound sets torch's thread count and leaves it changed
        with _AUTO_ROUND, _quiet_warnings(), keep_unfused_experts(), torch.enable_grad():
            try:
                ar = AutoRound(model, tokenizer, **kwargs)
                ar.quantize()
            except SystemExit as exc:  # auto-round calls sys.exit(-1) on inputs it cannot batch
                raise quantplug.PluginError(
                    f"auto-round gave up on this model or its calibration batches (it called sys.exit({exc.code}); "
                    f"its log above says why); quantplug-autoround feeds it one sample per row, so report this "
                    f"with the model and the batch shapes"
                ) from None
            finally:
                torch.set_num_threads(threads)

    # -- checkpoints --------------------------------------------------------------------------

    def _packing_module(self, name: str, module: nn.Linear) -> nn.Module:
        c = self.config
        scheme = c.layer_scheme(name)
        bits, group = scheme["bits"], scheme["group_size"]
        if _is_awq(c.packing):
            return WQLinear_GEMM.from_linear(module, bits, group, init_only=True)
        cls = dynamic_import_quant_linear_for_packing(c.packing, bits, group, scheme["sym"])
        with torch.device("meta"):
            return cls(
                bits,
                group,
                module.in_features,
                module.out_features,
                module.bias is not None,
                weight_dtype=module.weight.dtype,
            )

    def expected_tensors(self, name, module):
        # the bias in any float dtype, cast on load: auto-round's exporter restores a quantized layer's
        # bias to the source checkpoint's dtype (fp32 beside fp16 scales: gpt-oss's attention)
        tensors = self._packing_module(name, module).state_dict().items()
        return {k: (tuple(t.shape), None if k == "bias" else t.dtype) for k, t in tensors}

    def explain_stored_layout(self, name, stored):
        qweight = stored.get("qweight")
        if qweight is None or len(qweight[0]) != 1:
            return None
        return (
            f"a flat qweight ({qweight[1]}) is auto-round-lib's CPU kernel's repacked layout, not the "
            f"{self.config.packing_format} packing config.json names: Transformers' save_pretrained writes it after "
            f"loading a checkpoint with that kernel (its default on a CPU), and neither Transformers nor quantplug "
            f"reads it. Save again from the original checkpoint, loaded with quantplug or with Transformers and "
            f'AutoRoundConfig(backend="torch")'
        )

    def offload_refusal(self) -> str | None:
        return (
            "auto-round-lib's CPU kernel repacks a layer's weights on load, and the layer keeps the "
            "checkpoint's tensors beside them as attributes (for saving), which accelerate's hooks "
            "neither offload nor move"
        )

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return self._packing_module(name, module)

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        stored = getattr(qmodule, CHECKPOINT_ATTR, None)
        return dict(stored) if stored is not None else dict(qmodule.state_dict())

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        c = self.config
        scheme = {**c.layer_scheme(name), "data_type": "int", "act_bits": 16}
        device = self._device.type
        kind = get_layer_backend(
            device, c.backend, c.packing, scheme, module.in_features, module.out_features
        )
        if kind and kind.startswith("auto_round_kernel") and c.backend == "auto":
            # auto-round-lib's kernel is chosen only when asked for by name, or when auto-round has no
            # torch backend for the layer: its outputs were wrong in measured situations (see
            # _never_single_threaded and the README's limits)
            torch_kind = get_layer_backend(
                device, "torch", c.packing, scheme, module.in_features, module.out_features
            )
            if torch_kind and "fake" not in torch_kind:
                kind = torch_kind
            else:
                _warn_once(
                    f"auto-round has no torch backend for {c.packing} layers like {name} ({scheme}) here, so they "
                    f"run auto-round-lib's kernel (never single-threaded; see quantplug-autoround's README for "
                    f"its limits). Installing gptqmodel gives auto-round a torch AWQ/GPTQ backend."
                )
        if not kind:
            raise quantplug.BackendUnavailableError(
                f"auto-round has no inference backend for {name} ({scheme}, packing {c.packing_format}) on {device} "
                f"with backend={c.backend!r}; install auto-round-lib (CPU) or set backend='auto'"
            )
        with torch.device("meta"):
            qmodule = _create_quant_layer(
                module, kind, scheme, module.in_features, module.out_features, c.packing
            )
        for key, value in tensors.items():
            mine = getattr(qmodule, key, None)
            if key == "bias" and mine is not None and value.dtype != mine.dtype:
                value = value.to(mine.dtype)  # as Transformers reads it (see expected_tensors)
            setattr(qmodule, key, value)  # the buffers, as stored (the kernel's post_init converts them)
        left = [k for k, t in [*qmodule.named_parameters(), *qmodule.named_buffers()] if t.is_meta]
        if left:
            raise quantplug.PluginError(
                f"auto-round's {kind} module for {name} needs tensors {left} that its checkpoint format "
                f"({c.packing}) does not hold; pin another backend (backend='torch')"
            )
        post_init = getattr(qmodule, "post_init", None)
        if callable(post_init):
            with _AUTO_ROUND:
                post_init()
        setattr(qmodule, CHECKPOINT_ATTR, dict(tensors))
        qmodule.quantplug_backend = kind
        if type(qmodule).__module__.startswith("auto_round_kernel"):
            qmodule.__class__ = _never_single_threaded(type(qmodule))
        return qmodule


# -- helpers ---------------------------------------------------------------------------------

# auto-round-lib 0.16.0's CPU kernel (``ark.woqgemm``) is used only with backend="ark"
# (never by "auto"): it returns wrong outputs -- rows of garbage, some
# inf -- whenever torch runs on one thread (measured against auto-round's torch backend: relative
# error 0.8 to inf at 1 thread, 0.007 at 2, 3 or 4; the thread count at load does not matter). Its
# modules therefore never run single-threaded: a call made at one thread raises torch's count to 2
# for its duration. Calls hold ``_AUTO_ROUND`` (torch's thread count is process-wide, and AutoRound
# lowers it while it tunes), so kernel calls from several Python threads run one at a time; each is
# parallel inside.
_SAFE_CLASSES: dict[type, type] = {}


def _never_single_threaded(cls: type) -> type:
    """``cls`` (an auto-round-lib module class) with its forward run at two threads or more."""
    if cls not in _SAFE_CLASSES:

        def forward(self, x):
            with _AUTO_ROUND:
                threads = torch.get_num_threads()
                if threads >= 2:
                    return cls.forward(self, x)
                torch.set_num_threads(2)
                try:
                    return cls.forward(self, x)
                finally:
                    torch.set_num_threads(threads)

        _SAFE_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__})
    return _SAFE_CLASSES[cls]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _is_awq(packing: str) -> bool:
    return "awq" in packing


def _blocks(model: nn.Module) -> list:
    try:
        return get_block_names(model) if hasattr(model, "config") else []
    except Exception:
        return []


@contextlib.contextmanager
def _quiet_warnings():
    """auto-round warns once per argument that passing it directly is "supported"; keep its logs,
    drop those."""
    log = logging.getLogger("autoround")

    class _Drop(logging.Filter):
        def filter(self, record):
            return "directly to AutoRound is supported" not in record.getMessage()

    f = _Drop()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)
