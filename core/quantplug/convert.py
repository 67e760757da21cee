"""The model walk: which modules to quantize, replacing them with the backend's modules, progress,
and a report of what changed. Backends only ever see one ``nn.Linear`` at a time.

Eligible modules are exactly ``nn.Linear`` and Transformers' ``Conv1D`` (GPT-2 style, weight stored
transposed; handed to the backend as the equivalent ``nn.Linear``). Subclasses of ``nn.Linear``
(a backend's own modules, adapters) are never touched, so quantizing twice is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .devices import model_device, to_device
from .errors import ConfigError
from .matching import listed_reason
from .registry import AutoQuantizer

#: attribute on a quantized model holding its ``QuantizedModelInfo``
INFO_ATTR = "quantplug_info"


@dataclasses.dataclass
class QuantizedModelInfo:
    """What quantplug knows about a model it quantized or loaded."""

    config: QuantConfig
    quantizer: Any
    modules: list[str]


@dataclasses.dataclass
class QuantizeReport:
    """What ``quantize`` did."""

    backend: str
    config: dict[str, Any]
    converted: list[str]
    skipped: dict[str, str]
    bytes_before: int
    bytes_after: int
    seconds: float

    def __str__(self) -> str:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        lines = [
            f"quantplug: {self.backend}: converted {len(self.converted)} module(s), skipped {len(self.skipped)}, "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x) "
            f"in {self.seconds:.1f} s"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def is_eligible(module: nn.Module) -> bool:
    return type(module) is nn.Linear or is_conv1d(module)


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function as ``module`` (``module`` itself if it is one)."""
    if type(module) is nn.Linear:
        return module
    lin = as_linear_meta(module)  # Conv1D: weight stored [in, out]
    lin.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return lin


def transformers_tied_keys(model: nn.Module) -> dict[str, str]:
    """Transformers' tied parameters that this model really ties (target key -> source key)."""
    keys = getattr(model, "all_tied_weights_keys", None)  # Transformers 5: already honours the config
    if isinstance(keys, dict):
        return dict(keys)
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict) and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return dict(keys)
    return {}


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Linear modules whose weight shares storage with an earlier parameter: name -> the other name."""
    seen: dict[int, str] = {}
    tied = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.device.type == "meta":
            continue
        key = p.data_ptr()
        if key in seen and pname.endswith(".weight"):
            tied[pname[: -len(".weight")]] = seen[key]
        seen.setdefault(key, pname)
    for target, source in transformers_tied_keys(model).items():  # also meaningful on meta skeletons
        if target.endswith(".weight"):
            tied.setdefault(target[: -len(".weight")], source)
    return tied


def default_skips(model: nn.Module) -> dict[str, str]:
    """Modules left in full precision when ``modules_to_not_convert`` is None: the output head and
    any layer whose weight is tied to another parameter."""
    out = {}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        for name, mod in model.named_modules():
            if mod is head:
                out[name] = (
                    "output head (kept in full precision by default; set modules_to_not_convert=[] to quantize it)"
                )
    for name, other in _tied_names(model).items():
        out.setdefault(name, f"weight tied to {other}")
    return out


def default_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers ``quantize`` converts with a default config (eligible, not the output head, not
    tied), in model order, before any backend's ``skip_reason``."""
    skips = default_skips(model)
    return [(name, m) for name, m in model.named_modules() if name and is_eligible(m) and name not in skips]


def plan(model: nn.Module, config: QuantConfig, quantizer: Any) -> tuple[list[str], dict[str, str]]:
    """The modules to quantize (in model order) and the eligible ones skipped, with reasons.
    Works on meta-device skeletons too: it looks at structure and shapes only."""
    skips = default_skips(model) if config.modules_to_not_convert is None else {}
    convert, skipped = [], {}
    for name, module in model.named_modules():
        if not name or not is_eligible(module):
            continue
        listed = listed_reason(name, config)
        if name in skips:
            skipped[name] = skips[name]
        elif listed:
            skipped[name] = listed
        else:
            why = quantizer.skip_reason(name, as_linear_meta(module))
            if why:
                skipped[name] = why
            else:
                convert.append(name)
    return convert, skipped


def as_linear_meta(module: nn.Module) -> nn.Linear:
    """A meta-device ``nn.Linear`` with the shape, dtype and bias of ``module`` (no data)."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
    else:
        out_f, in_f = module.weight.shape
    return nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta", dtype=module.weight.dtype)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def tensor_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="module", disable=not (enabled and sys.stderr.isatty()), leave=False
    )


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


#: ``quantize`` hands freed memory back to the OS once this much full-precision weight has been
#: replaced (and at the end), not after every layer: trimming after every layer made the next
#: layer's temporaries fault in fresh pages, up to 1.9x the libraries' own quantize time
#: (bench/overhead.py), for at most this much more peak memory.
TRIM_EVERY_BYTES = 256 * 2**20


def attach_info(model: nn.Module, info: QuantizedModelInfo) -> None:
    setattr(model, INFO_ATTR, info)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        # As Transformers does when it quantizes: save_pretrained then writes quantization_config.
        # (quantplug.save derives it from INFO_ATTR instead, so a config object shared with an
        # unquantized model cannot mislabel that model's checkpoint there.)
        current = getattr(hf_config, "quantization_config", None)
        if not (hasattr(current, "to_dict") and current.to_dict() == info.config.to_dict()):
            hf_config.quantization_config = info.config.to_dict()
    # Transformers is in use (its quantizer registry is imported): let from_pretrained load this method too.
    if "transformers.quantizers.auto" in sys.modules:
        from .integrations.transformers import register_with_transformers

        register_with_transformers()


def calibration_batches(
    quantizer: Any, calibration_data: Iterable[Any] | None, device: torch.device
) -> list[Any] | None:
    """``calibration_data`` as a list of batches on ``device``, checked against what the config
    needs: a config that needs calibration without data, data for a config that takes none, an
    empty iterable and a batch that is neither a tensor nor a mapping are ``ConfigError``s."""
    config = quantizer.config
    needed = quantizer.needs_calibration()
    if calibration_data is None:
        if needed:
            raise ConfigError(
                f"{type(config).__name__} ({config.quant_method}) needs calibration data: pass "
                f"calibration_data= to quantplug.quantize (an iterable of model inputs: token-id tensors "
                f"or dicts of tensors, e.g. a few hundred tokens of representative text)",
                field="calibration_data",
                value=None,
                allowed="an iterable of model inputs",
            )
        return None
    if not needed:
        raise ConfigError(
            f"{type(config).__name__} ({config.quant_method}) takes no calibration data; "
            f"drop calibration_data= (or choose a config that calibrates)",
            field="calibration_data",
            value=type(calibration_data).__name__,
            allowed="None for this config",
        )
    if isinstance(calibration_data, (torch.Tensor, Mapping, str, bytes)):
        raise ConfigError(
            "calibration_data must be an iterable of batches (e.g. [ids1, ids2] or [{'input_ids': ids}]), "
            f"not a single {type(calibration_data).__name__}; wrap one batch in a list",
            field="calibration_data",
            value=type(calibration_data).__name__,
            allowed="an iterable of tensors or dicts of tensors",
        )
    batches = []
    for i, batch in enumerate(calibration_data):
        if not isinstance(batch, (torch.Tensor, Mapping)):
            raise ConfigError(
                f"calibration_data batch {i} is a {type(batch).__name__}; each batch must be a tensor "
                f"(passed as the model's first argument) or a dict of model keyword arguments",
                field="calibration_data",
                value=type(batch).__name__,
                allowed="tensors or dicts of tensors",
            )
        batches.append(to_device(batch, device))
    if not batches:
        raise ConfigError(
            "calibration_data is empty; pass at least one batch of model inputs",
            field="calibration_data",
            value=[],
            allowed="a non-empty iterable of model inputs",
        )
    return batches


def quantize(
    model: nn.Module,
    config: QuantConfig | dict[str, Any],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    calibration_data: Iterable[Any] | None = None,
) -> QuantizeReport:
    """Quantize ``model`` in place with the backend that owns ``config.quant_method``.

    Eligible layers (``nn.Linear``, Transformers' ``Conv1D``) are replaced by the backend's modules,
    except ``modules_to_not_convert`` and, by default, the output head and tied layers. Each layer
    is moved to ``device`` (default: where the model's parameters are) before it is quantized.
    ``calibration_data`` is an iterable of model inputs (tensors, e.g. token ids, or dicts of
    tensors passed as keyword arguments), required by configs that need calibration (activation
    quantization, GPTQ-style methods) and refused by those that do not: after every layer is
    replaced, the quantizer's ``calibrate(model, batches)`` runs them through the model.
    Returns a ``QuantizeReport``; the model keeps working (``forward``, ``generate``).
    """
    t0 = time.perf_counter()
    quantizer = AutoQuantizer.from_config(config)
    config = quantizer.config
    if getattr(model, INFO_ATTR, None) is not None:
        done = getattr(model, INFO_ATTR).config
        raise ConfigError(
            f"this model is already quantized with {done.quant_method!r}; quantize a fresh full-precision model instead",
            field="quant_method",
            value=config.quant_method,
            allowed="a model quantplug has not quantized yet",
        )
    target = torch.device(device) if device is not None else model_device(model)
    quantizer.validate_environment(target)
    batches = calibration_batches(quantizer, calibration_data, target)
    names, skipped = plan(model, config, quantizer)
    before = untrimmed = 0
    with torch.no_grad(), progress_bar(len(names), f"quantizing ({config.quant_method})", progress) as bar:
        for name in names:
            module = model.get_submodule(name)
            size = tensor_bytes([module.weight] + ([module.bias] if module.bias is not None else []))
            before, untrimmed = before + size, untrimmed + size
            linear = as_linear(module.to(target))
            qmodule = quantizer.quantize_module(name, linear)
            set_submodule(model, name, qmodule)
            del module, linear
            if untrimmed >= TRIM_EVERY_BYTES:
                release_freed_memory()
                untrimmed = 0
            bar.update(1)
    release_freed_memory()
    if any(t.device.type != target.type for t in [*model.parameters(), *model.buffers()]):
        model.to(target)  # the layers left in full precision follow the quantized ones
    if batches is not None:
        with torch.no_grad():
            quantizer.calibrate(model, batches)
        release_freed_memory()
    # Measured after calibration: a quantizer may finish its layers there.
    after = sum(tensor_bytes(quantizer.module_tensors(n, model.get_submodule(n)).values()) for n in names)
    attach_info(model, QuantizedModelInfo(config, quantizer, names))
    return QuantizeReport(
        backend=config.quant_method,
        config=config.to_dict(),
        converted=names,
        skipped=skipped,
        bytes_before=before,
        bytes_after=after,
        seconds=time.perf_counter() - t0,
    )
