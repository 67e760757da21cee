"""``GptqQuantizer``: GPTQ through GPTQModel, on quantplug's calibration hook.

``quantize_module`` leaves each layer as it is and notes its name; ``calibrate`` then runs
GPTQModel's GPTQ on every noted layer (``calibration.calibrate_model`` orders the work) and
replaces each by a ``GptqLinear`` packed by GPTQModel. Pre-quantized checkpoints (``quant_method:
gptq``, v1 or v2) load through ``load_module``.
"""

from __future__ import annotations

import os
import warnings

# GPTQModel sizes its worker pools from this; its loader needs 2 even on a machine with fewer cores
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(os.cpu_count() or 1, 8))))

import torch  # noqa: E402
from gptqmodel.quantization.config import QuantizeConfig, dynamic_get  # noqa: E402
from gptqmodel.quantization.gptq import GPTQ  # noqa: E402
from torch import nn  # noqa: E402

import quantplug  # noqa: E402

from .calibration import calibrate_model, check_batches  # noqa: E402
from .config import GptqConfig  # noqa: E402
from .grids import gptq_grid, gptq_tensors  # noqa: E402
from .layers import PACK_MULTIPLE, GptqLinear  # noqa: E402


class GptqQuantizer(quantplug.Quantizer):
    def __init__(self, backend, config):
        super().__init__(backend, config)
        self._pending: dict[str, nn.Linear] = {}

    def check_config(self) -> None:
        sizes = GptqLinear.SUPPORTS_GROUP_SIZE
        if self.config.group_size not in sizes:
            raise quantplug.ConfigError(
                f"GptqConfig: group_size={self.config.group_size} is not one GPTQModel's kernels run; "
                f"allowed: {', '.join(map(str, sizes))}",
                field="group_size",
                value=self.config.group_size,
                allowed=list(sizes),
            )

    # -- which layers ------------------------------------------------------------------------

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        cfg = self.config
        inner = cfg.modules_in_block_to_quantize
        if inner is not None and not any(
            name.endswith("." + n) or name == n for group in inner for n in group
        ):
            return "not in modules_in_block_to_quantize"
        if cfg.dynamic and dynamic_get(cfg.dynamic, name) is False:  # only '-:' rules pass validate()
            return "excluded by a '-:' rule of dynamic"
        in_f, out_f = _features(module)
        if in_f % PACK_MULTIPLE or out_f % PACK_MULTIPLE:
            return (
                f"{in_f} inputs x {out_f} outputs: GPTQModel's packer needs both to be multiples of "
                f"{PACK_MULTIPLE}"
            )
        return None

    # -- quantize ----------------------------------------------------------------------------

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        self._pending[name] = module  # quantized in calibrate(), once the data has flowed through it
        return module

    def calibrate(self, model: nn.Module, batches: list) -> None:
        check_batches(model, batches)
        names, self._pending = list(self._pending), {}
        _warn_partial_groups(model, names, self.config.group_size)
        calibrate_model(
            model, names, batches, self.config, lambda subset, run: self._gptq(model, subset, run)
        )

    def _gptq(self, model: nn.Module, names: list[str], run) -> None:
        """GPTQ on ``names``: gather their input Hessians while ``run()`` feeds data, then round and pack."""
        cfg = self.config
        stats, hooks = {}, []
        for name in names:
            layer = model.get_submodule(name)
            stats[name] = GPTQ(layer, qcfg=self._library_config())
            stats[name].quantizer.configure(bits=cfg.bits, sym=cfg.sym, perchannel=True)
            hooks.append(layer.register_forward_hook(_collector(stats[name])))
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        for name in names:
            layer, gptq = model.get_submodule(name), stats.pop(name)
            if gptq.nsamples == 0:
                raise quantplug.PluginError(
                    f"quantplug-gptqmodel: layer {name!r} received no calibration input (it did not run "
                    f"when the calibration batches did); add it to modules_to_not_convert"
                )
            scale, zero, g_idx, *_ = gptq.hf_quantize(
                percdamp=cfg.damp_percent,
                damp_auto_increment=cfg.damp_auto_increment,
                group_size=cfg.group_size,
                actorder=cfg.desc_act,
                static_groups=cfg.static_groups,
                act_group_aware=cfg.group_aware_order,
            )
            gptq.free()
            model.set_submodule(name, self._pack(layer, scale, zero, g_idx))

    def _library_config(self):
        cfg = self.config
        return QuantizeConfig(
            bits=cfg.bits,
            group_size=cfg.group_size,
            sym=cfg.sym,
            desc_act=cfg.desc_act,
            act_group_aware=cfg.group_aware_order,
            damp_percent=cfg.damp_percent,
            damp_auto_increment=cfg.damp_auto_increment,
            static_groups=cfg.static_groups,
            fallback=None,  # never swap in round-to-nearest quietly
            offload_to_disk=False,
        )

    def _pack(self, layer: nn.Linear, scale, zero, g_idx) -> GptqLinear:
        out = GptqLinear(
            self.config, layer.in_features, layer.out_features, layer.bias is not None, layer.weight.dtype
        )
        device = layer.weight.device
        cpu = layer.to("cpu")
        out.pack(cpu, scale.to("cpu"), zero.to("cpu"), g_idx.to("cpu"))  # GPTQModel packs on the CPU
        # pack runs under torch.inference_mode: its tensors would refuse in-place updates later
        for key, t in list(out.named_buffers(recurse=False)):
            out.register_buffer(key, t.clone(), persistent=key in out.state_dict())
        if cpu.bias is not None:
            out.register_buffer("bias", cpu.bias.detach().clone())
        out.qzero_format(format=2)  # what pack wrote
        return out.to(device).finish()

    # -- checkpoints -------------------------------------------------------------------------

    def offload_refusal(self) -> str | None:
        # Forced through the kit's check on CPU, a disk-offloaded layer did give equal logits; but
        # TorchLinear caches decoded zero points and g_idx as plain attributes at its first forward.
        return (
            "GPTQModel's TorchLinear keeps caches built at its first forward (decoded zero points, g_idx on "
            "the execution device) as attributes beside its buffers, which accelerate's hooks neither "
            "offload nor move"
        )

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        with torch.device("meta"):
            return GptqLinear(
                self.config,
                module.in_features,
                module.out_features,
                module.bias is not None,
                module.weight.dtype,
            )

    def expected_tensors(self, name: str, module: nn.Linear):
        out = {k: (tuple(t.shape), t.dtype) for k, t in self.empty_module(name, module).state_dict().items()}
        # scales and bias are stored in the model's float dtype by some tools, float16 by others
        out["scales"] = (out["scales"][0], None)
        if "bias" in out:
            out["bias"] = (out["bias"][0], None)
        return out

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        return qmodule.checkpoint_tensors()

    def integer_grid(self, name: str, qmodule: nn.Module):
        """GPTQ's codes and zero points (v2 in memory: the zero itself) shifted to signed integers;
        act-order layers list their inputs in group order (``IntegerGrid.columns``)."""
        if not isinstance(qmodule, GptqLinear):
            return f"{type(qmodule).__name__} is not a GPTQ layer of this plugin"
        return gptq_grid(qmodule, self.config.sym, self.config.desc_act)

    def encode_grid(self, name: str, module: nn.Linear, grid) -> nn.Module:
        """A ``GptqLinear`` holding exactly ``grid`` (its ``checkpoint_tensors`` in this config's format)."""
        tensors = gptq_tensors(name, module, grid, self.config)
        layer = GptqLinear(
            self.config, module.in_features, module.out_features, module.bias is not None, module.weight.dtype
        )
        return layer.load_v2_tensors(tensors)

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        for key in ("scales", "bias"):
            t = tensors.get(key)
            if t is not None and not t.dtype.is_floating_point:
                raise quantplug.CheckpointError(
                    f"{name}.{key}: stored as {t.dtype}, expected a float dtype: the checkpoint is damaged"
                )
        groups = tensors["scales"].shape[0]
        g_idx = tensors["g_idx"]
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise quantplug.CheckpointError(
                f"{name}.g_idx: group indices {int(g_idx.min())}..{int(g_idx.max())} do not fit the {groups} "
                f"groups of {name}.scales; the checkpoint is corrupt or its group_size ({self.config.group_size}) "
                f"is not the one it was quantized with"
            )
        _refuse_v2_zeros_labelled_v1(name, self.config, tensors["qzeros"])
        layer = GptqLinear(
            self.config, module.in_features, module.out_features, module.bias is not None, module.weight.dtype
        )
        return layer.load_checkpoint_tensors(dict(tensors))


def _refuse_v2_zeros_labelled_v1(name: str, config: GptqConfig, qzeros: torch.Tensor) -> None:
    """A symmetric v1 ("gptq") checkpoint stores every zero point as 2**(bits-1) - 1. Every one at
    2**(bits-1) is GPTQModel's v2 layout under a v1 label: what Transformers' ``save_pretrained``
    writes after loading a v1 checkpoint with GPTQModel's CPU kernels (they convert the zero points
    in memory, and the save does not convert them back). Read as v1, every weight would be off by
    one step; Transformers itself reloads it so. Asymmetric zero points cannot be told apart."""
    bits = config.bits
    if not config.sym or config.format != "gptq" or 32 % bits or qzeros.dtype != torch.int32:
        return

    def word(zero: int) -> int:
        value = sum(zero << (bits * i) for i in range(32 // bits))
        return value - (1 << 32) if value >= 1 << 31 else value

    if qzeros.numel() and bool((qzeros == word(2 ** (bits - 1))).all()):
        raise quantplug.CheckpointError(
            f"{name}.qzeros: every zero point is {2 ** (bits - 1)}, as GPTQModel's v2 layout stores them, but "
            f"config.json says format 'gptq' (v1, which stores this symmetric zero point as {2 ** (bits - 1) - 1}): "
            f"read as v1, every weight would be off by one step. Transformers' save_pretrained writes this after "
            f"loading a v1 GPTQ checkpoint with GPTQModel's CPU kernels (Transformers reloads it wrong too). If "
            f'that is how it was saved, set "format" and "checkpoint_format" to "gptq_v2" in config.json\'s '
            f"quantization_config; otherwise re-save it from the original checkpoint"
        )


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = module.weight  # Transformers' Conv1D stores [in, out]
    return weight.shape[0], weight.shape[1]


def _warn_partial_groups(model: nn.Module, names: list[str], group_size: int) -> None:
    partial = [n for n in names if group_size > 0 and model.get_submodule(n).in_features % group_size]
    if partial:
        warnings.warn(
            f"{len(partial)} layer(s) (e.g. {partial[0]}, {model.get_submodule(partial[0]).in_features} inputs) "
            f"have a partial last group of group_size {group_size}: quantplug and GPTQModel's torch kernel run "
            f"them, but Transformers' CPU GPTQ kernel (TorchAtenLinear) refuses such checkpoints; a group_size "
            f"that divides every layer's inputs (e.g. 64 or 32) avoids this",
            stacklevel=3,
        )


def _collector(gptq):
    def hook(_module, args, output):
        gptq.add_batch(args[0].data, output.data)

    return hook
