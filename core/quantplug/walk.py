"""The one layer walk: plan which layers a quantizer replaces, then replace them one at a time.

Every path that puts a backend's modules into a model goes through ``LayerWalk``: ``quantize``
(``quantize_module`` on each layer), quantize-on-load and pre-quantized ``load`` (the layer's
tensors are read, then ``quantize_module`` / ``load_module``), and the Transformers bridge
(``empty_module`` before Transformers loads the weights, ``load_module`` or ``quantize_module``
after). The walk owns the order, the progress bar, handing freed memory back to the OS, and the
``QuantizedModelInfo`` a quantized model carries; the caller says only how one layer is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .errors import ConfigError
from .layers import as_linear_meta, plan, set_submodule, tensor_bytes
from .matching import listed_reason

logger = logging.getLogger("quantplug")

#: attribute on a quantized model holding its ``QuantizedModelInfo``
INFO_ATTR = "quantplug_info"

#: ``quantize`` hands freed memory back to the OS once this much full-precision weight has been
#: replaced (and at the end), not after every layer: trimming after every layer made the next
#: layer's temporaries fault in fresh pages, up to 1.9x the libraries' own quantize time
#: (bench/overhead.py), for at most this much more peak memory.
TRIM_EVERY_BYTES = 256 * 2**20


@dataclasses.dataclass
class QuantizedModelInfo:
    """What quantplug knows about a model it quantized or loaded."""

    config: QuantConfig
    quantizer: Any
    modules: list[str]
    experts: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The modules of ``modules`` that are stacked experts the backend quantized natively, with
    their ``ExpertsLayout`` (``quantplug.experts_contract``)."""
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    """Each of ``modules``: the kernel that runs it, or why it runs its backend's module
    (``quantplug.kernel_layer``)."""


def quantized_info(model: nn.Module) -> QuantizedModelInfo | None:
    """The ``QuantizedModelInfo`` of a model quantplug quantized or loaded, else ``None``."""
    return getattr(model, INFO_ATTR, None)


def attach_info(model: nn.Module, info: QuantizedModelInfo) -> None:
    """Record ``info`` on ``model``, the quantizer's ``model_attributes`` (what PEFT reads) and, for
    a Transformers model, its ``quantization_config`` (as Transformers does when it quantizes, so
    ``save_pretrained`` writes it). Only sets data."""
    setattr(model, INFO_ATTR, info)
    for key, value in info.quantizer.model_attributes().items():
        setattr(model, key, value)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        # (quantplug.save derives quantization_config from INFO_ATTR instead, so a config object
        # shared with an unquantized model cannot mislabel that model's checkpoint there.)
        current = getattr(hf_config, "quantization_config", None)
        if not (hasattr(current, "to_dict") and current.to_dict() == info.config.to_dict()):
            hf_config.quantization_config = info.config.to_dict()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "module"):
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and sys.stderr.isatty()), leave=False)


_malloc_trim: Any = None


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). Layer-by-layer quantization frees many medium-sized temporaries; without this,
    glibc keeps them and peak RSS on a 1B-parameter quantize-on-load rises by ~0.4 GB
    (bench/quantize_on_load.py)."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    if _malloc_trim:
        _malloc_trim(0)


def _meta_copy(module: nn.Module) -> nn.Module:
    """``module`` if its tensors are on the meta device, else a copy of it there."""
    if all(t.device.type == "meta" for t in module.parameters()):
        return module
    import copy

    return copy.deepcopy(module).to("meta")


#: how one layer is built: (module name, the module now in the model) -> its replacement
BuildLayer = Callable[[str, nn.Module], nn.Module]


class LayerWalk:
    """The layers ``quantizer`` replaces in ``model`` (``names``, in model order) and those it
    leaves in full precision (``skipped``, with reasons), planned on construction; ``replace``
    swaps them, ``finish`` records the result on the model."""

    def __init__(self, model: nn.Module, quantizer: Any, stored: set[str] | None = None):
        from .sites import (  # (-> checkpoint -> walk)
            native_sites,
            restore_unplanned,
            stacked_skips,
            unfuse_sites,
        )

        self.model = model
        self.quantizer = quantizer
        originals = unfuse_sites(model, quantizer, stored)  # MoE experts: a Linear per expert projection
        self.names, self.skipped = plan(model, quantizer.config, quantizer)
        restore_unplanned(model, originals, self.names)
        self.native_experts = native_sites(model, quantizer, self.skipped)  # or stacked, natively
        if self.native_experts:
            order = {name: i for i, (name, _) in enumerate(model.named_modules())}
            self.names = sorted([*self.names, *self.native_experts], key=order.__getitem__)
        for site in originals:
            left = {k: why for k, why in self.skipped.items() if k.startswith(site + ".")}
            if left and model.get_submodule(site) is originals[site]:  # kept stacked: one entry
                for k in left:
                    del self.skipped[k]
                self.skipped[site] = f"{next(iter(left.values()))} (all {len(left)} expert projections)"
        stacked = stacked_skips(model)
        if stacked and quantizer.config.modules_to_not_convert is not None:
            asked = [n for n in stacked if not listed_reason(n, quantizer.config)]
            if asked:  # the config says: everything but modules_to_not_convert
                raise ConfigError(
                    f"{asked[0]}: {stacked[asked[0]]}; modules_to_not_convert does not list it, so quantizing "
                    f"it was asked for: add it to modules_to_not_convert to keep it in full precision",
                    field="modules_to_not_convert",
                    value=list(quantizer.config.modules_to_not_convert),
                    allowed=f"a list that includes {asked[0]!r}",
                )
        for name, why in stacked.items():
            logger.warning("quantplug: %s left unquantized: %s", name, why)
        self.skipped.update(stacked)

    def keep_stored_full_precision(self, spec: Callable[[str], Any], stored: set[str]) -> None:
        """Leave in full precision the planned layers a pre-quantized checkpoint (``stored`` keys,
        ``spec(key)`` -> (shape, dtype)) holds as a plain float weight and bias, where the backend
        says its format does that (``Quantizer.stored_full_precision``); anything else stays
        planned, and a layer missing its quantized tensors is refused by the load as before."""
        plain = (torch.float32, torch.float16, torch.bfloat16)
        for name in [n for n in self.names if n not in self.native_experts]:
            keys = {k for k in (f"{name}.weight", f"{name}.bias") if k in stored}
            if f"{name}.weight" not in keys or spec(f"{name}.weight")[1] not in plain:
                continue
            if any(
                f"{name}.{k}" in stored
                for k in self.quantizer.expected_tensors(name, self._meta(name))
                if k not in ("weight", "bias")
            ):
                continue
            why = self.quantizer.stored_full_precision(name)
            if why:
                self.names.remove(name)
                self.skipped[name] = f"stored in full precision by the checkpoint ({why})"

    def _meta(self, name: str) -> nn.Linear:
        return as_linear_meta(self.model.get_submodule(name))

    def meta_linears(self) -> dict[str, nn.Linear]:
        """Each planned layer as the meta ``nn.Linear`` a backend's ``empty_module`` /
        ``expected_tensors`` / ``load_module`` receive (shape, dtype and bias of the layer)."""
        return {
            name: _meta_copy(self.model.get_submodule(name))
            if name in self.native_experts
            else as_linear_meta(self.model.get_submodule(name))
            for name in self.names
        }

    def replace(
        self,
        build: BuildLayer,
        *,
        desc: str = "",
        progress: bool = False,
        trim_every: int = TRIM_EVERY_BYTES,
    ) -> int:
        """Replace every planned layer, in order, by ``build(name, module)``. Freed memory goes
        back to the OS whenever ``trim_every`` bytes of replaced layer tensors have accumulated
        (0: after every layer) and at the end. Returns the bytes of the replaced layers' tensors."""
        total = pending = 0
        with progress_bar(len(self.names), desc, progress) as bar:
            for name in self.names:
                module = self.model.get_submodule(name)
                size = tensor_bytes([*module.parameters(), *module.buffers()])
                total, pending = total + size, pending + size
                set_submodule(self.model, name, build(name, module))
                del module
                if pending >= trim_every:
                    release_freed_memory()
                    pending = 0
                bar.update(1)
        release_freed_memory()
        return total

    def finish(self) -> QuantizedModelInfo:
        """Attach the ``QuantizedModelInfo`` of what was replaced to the model, and return it."""
        info = QuantizedModelInfo(
            self.quantizer.config, self.quantizer, list(self.names), dict(self.native_experts)
        )
        attach_info(self.model, info)
        return info
