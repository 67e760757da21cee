"""``select``: rank the installed backends' presets for a model, a device and a memory budget, with
the reasons for every place and every rejection.

Nothing here knows any backend. Each plugin declares ``Capabilities`` and ``Preset``s (bits per
weight, devices, minimum CUDA capability, calibration, trainability, typical error, measured
speed); ``select`` filters and ranks those declarations, so a third-party plugin takes part as soon
as it is installed. No backend library (and, when the device is given, not even torch) is imported.
``compare`` then measures what ``select`` can only predict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .backend import WORKLOADS, Backend, Preset
from .config import QuantConfig
from .errors import ConfigError
from .known_methods import PLUGIN_FOR_METHOD
from .registry import as_config, get_backend
from .registry import backends as _backends
from .sizes import fmt_bytes, parse_size

Workload = Literal["decode", "prefill", "mixed"]
Priority = Literal["balanced", "quality", "size", "speed"]
PRIORITIES = ("balanced", "quality", "size", "speed")

#: With only a parameter count, the share of parameters assumed to stay unquantized (embeddings,
#: output head, norms): 3.9% in Llama-2-7B (2 x 131M of 6.74B). Pass a model, its folder or its
#: config for an exact split.
ASSUMED_UNQUANTIZED_SHARE = 0.04
#: Bits per weight assumed for a preset that does not declare ``bits_per_weight``: ``bits`` plus
#: one 16-bit scale and one 16-bit zero point per group of 64 weights.
ASSUMED_GROUP_OVERHEAD_BITS = 0.5
#: Relative errors below this are treated as equal when ranking: differences between 8-bit methods
#: (0.004 vs 0.01) do not show in a model's output, those between 4- and 2-bit methods do.
ERROR_FLOOR = 0.01

QUALITY_WORDS = ((0.02, "near-lossless"), (0.07, "small loss"), (0.15, "noticeable loss"))


def _quality_word(err: float) -> str:
    for bound, word in QUALITY_WORDS:
        if err <= bound:
            return word
    return "large loss"


# -- the model's size ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """How many weights a quantization would convert, and what stays in full precision."""

    quantizable_params: int
    """Weights of the layers ``quantize`` converts by default (Linear layers but the output head)."""
    other_params: int
    """Everything else (embeddings, output head, norms, biases), kept at ``dtype_bytes`` each."""
    dtype_bytes: float = 2.0
    source: str = ""
    exact: bool = True
    pre_quantized: Mapping[str, Any] | None = None
    """``quantization_config`` of a pre-quantized checkpoint (its method decides)."""
    checkpoint_bytes: int | None = None

    @property
    def total_params(self) -> int:
        return self.quantizable_params + self.other_params

    @property
    def unquantized_bytes(self) -> int:
        return int(self.total_params * self.dtype_bytes)

    def predicted_bytes(self, bits_per_weight: float) -> int:
        return int(self.quantizable_params * bits_per_weight / 8 + self.other_params * self.dtype_bytes)


def _from_param_count(n: float) -> ModelSize:
    if isinstance(n, bool) or not (isinstance(n, (int, float)) and math.isfinite(n) and n >= 1):
        raise ConfigError(
            f"a parameter count must be a positive number, e.g. 7e9; got {n!r}",
            field="model",
            value=n,
            allowed="a number of parameters, an nn.Module, a model folder or a config",
        )
    other = int(n * ASSUMED_UNQUANTIZED_SHARE)
    return ModelSize(
        quantizable_params=int(n) - other,
        other_params=other,
        source=f"{n:.3g} parameters; {ASSUMED_UNQUANTIZED_SHARE:.0%} assumed to stay 16-bit (embeddings, head)",
        exact=False,
    )


def _from_config_dict(cfg: Mapping[str, Any], source: str) -> ModelSize:
    """Estimate from a Transformers decoder config's dimensions (Llama-style blocks)."""
    try:
        h = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{source}: cannot size the model from its config (needs hidden_size, num_hidden_layers and "
            f"vocab_size; missing or invalid: {exc}); pass the model itself, its folder with safetensors "
            f"weights, or a parameter count",
            field="model",
        ) from None
    inter = int(cfg.get("intermediate_size") or 4 * h)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    mlp = 3 * h * inter
    tied = bool(cfg.get("tie_word_embeddings", False))
    return ModelSize(
        quantizable_params=layers * (attn + mlp),
        other_params=vocab * h * (1 if tied else 2) + (2 * layers + 1) * h,
        dtype_bytes=_dtype_bytes(cfg.get("dtype") or cfg.get("torch_dtype")),
        source=f"{source} (estimated from its dimensions, Llama-style blocks)",
        exact=False,
        pre_quantized=cfg.get("quantization_config"),
    )


def _dtype_bytes(name: Any) -> float:
    return {"float32": 4.0, "float64": 8.0, "float16": 2.0, "bfloat16": 2.0}.get(str(name), 2.0)


_HEADER_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
}


def _safetensors_headers(folder: Path) -> dict[str, dict[str, Any]]:
    """Every tensor's dtype and shape from the folder's safetensors headers (headers only)."""
    out: dict[str, dict[str, Any]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConfigError(f"{file} is not a safetensors file (shorter than 8 bytes)", field="model")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ConfigError(f"{file}: safetensors header length {n} is implausible", field="model")
            try:
                header = json.loads(f.read(n))
            except ValueError as exc:
                raise ConfigError(f"{file}: unreadable safetensors header ({exc})", field="model") from None
        out.update({k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return out


def _is_embedding_or_head(key: str) -> bool:
    parts = key.lower().split(".")
    return any(p.startswith(("embed", "wte", "wpe", "lm_head", "output")) for p in parts[:-1])


def _from_folder(path: Path) -> ModelSize:
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise ConfigError(
            f"{path} has no config.json: pass a Transformers model folder, its config.json, a parameter "
            f"count (e.g. 7e9) or a model",
            field="model",
            value=str(path),
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ConfigError(f"{cfg_file} is not valid JSON: {exc}", field="model") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object", field="model")
    folder = cfg_file.parent
    tensors = _safetensors_headers(folder) if any(folder.glob("*.safetensors")) else {}
    if not tensors:
        return _from_config_dict(cfg, str(cfg_file))
    quantizable = other = 0
    checkpoint_bytes = 0
    dtype_counts: dict[float, int] = {}
    for key, info in tensors.items():
        shape = info.get("shape") or []
        numel = math.prod(int(d) for d in shape)
        size = _HEADER_DTYPE_BYTES.get(str(info.get("dtype")), 2)
        checkpoint_bytes += numel * size
        if len(shape) == 2 and key.endswith(".weight") and not _is_embedding_or_head(key):
            quantizable += numel
            dtype_counts[float(size)] = dtype_counts.get(float(size), 0) + numel
        else:
            other += numel
    dtype_bytes = max(dtype_counts, key=dtype_counts.get) if dtype_counts else 2.0
    return ModelSize(
        quantizable_params=quantizable,
        other_params=other,
        dtype_bytes=dtype_bytes,
        source=f"{folder} (safetensors headers: 2-D weights but embeddings and the output head)",
        exact=True,
        pre_quantized=cfg.get("quantization_config"),
        checkpoint_bytes=checkpoint_bytes,
    )


def _from_module(model: Any) -> ModelSize:
    from .convert import default_targets  # torch is already imported: we hold a model

    targets = default_targets(model)
    quantizable = sum(m.weight.numel() for _, m in targets)
    bytes_per = float(targets[-1][1].weight.element_size()) if targets else 2.0
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters counted once
    info = getattr(model, "quantplug_info", None)
    hf = getattr(model, "config", None)
    pre = getattr(hf, "quantization_config", None) if info is None else info.config.to_dict()
    if pre is not None and hasattr(pre, "to_dict"):
        pre = pre.to_dict()
    return ModelSize(
        quantizable_params=quantizable,
        other_params=total - quantizable,
        dtype_bytes=bytes_per,
        source=f"{type(model).__name__} ({len(targets)} layers quantize would convert)",
        exact=True,
        pre_quantized=pre,
    )


def model_size(model: Any) -> ModelSize:
    """A ``ModelSize`` from a parameter count, a model folder or config.json path, a Transformers
    config (object or dict), an ``nn.Module``, or a ``ModelSize``."""
    if isinstance(model, ModelSize):
        return model
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        return _from_param_count(model)
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        try:
            return _from_param_count(float(text))
        except ValueError:
            pass
        return _from_folder(Path(text))
    if isinstance(model, Mapping):
        return _from_config_dict(model, "config dict")
    if hasattr(model, "named_modules") and hasattr(model, "parameters"):
        return _from_module(model)
    if hasattr(model, "to_dict"):  # a Transformers PretrainedConfig
        return _from_config_dict(model.to_dict(), type(model).__name__)
    raise ConfigError(
        f"cannot size {type(model).__name__!r}: pass a parameter count (7e9), a model folder, a config or a model",
        field="model",
        value=type(model).__name__,
    )


# -- hardware -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    device: str
    """torch device type: ``cpu``, ``cuda``, ``mps``."""
    name: str = ""
    cuda_capability: tuple[int, int] | None = None
    memory_bytes: int | None = None
    detected: bool = True

    def describe(self) -> str:
        bits = [self.device]
        if self.name:
            bits.append(self.name)
        if self.cuda_capability:
            bits.append(f"compute capability {self.cuda_capability[0]}.{self.cuda_capability[1]}")
        if self.memory_bytes:
            bits.append(f"{fmt_bytes(self.memory_bytes)} memory")
        return ", ".join(bits) + ("" if self.detected else " (given, not detected)")


def _cpu_hardware(detected: bool) -> Hardware:
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", name, None, mem, detected)


def _cuda_hardware(index: int, detected: bool) -> Hardware:
    import torch

    props = torch.cuda.get_device_properties(index)
    return Hardware("cuda", props.name, (props.major, props.minor), props.total_memory, detected)


def detect_hardware(device: Hardware | str | None = None) -> Hardware:
    """The device to reason about: ``device`` when given (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"``, or a ``Hardware`` describing another machine), else the best one torch sees (CUDA,
    then MPS, then the CPU)."""
    if isinstance(device, Hardware):
        return device
    if device is not None:
        kind, _, index = str(device).partition(":")
        kind = kind.strip().lower()
        if kind == "cpu":
            return _cpu_hardware(False)
        if kind == "cuda":
            if "torch" in sys.modules or _torch_cuda_available():
                import torch

                if torch.cuda.is_available():
                    return _cuda_hardware(int(index or 0), False)
            return Hardware("cuda", "", None, None, False)
        if not kind or not kind.isidentifier():
            raise ConfigError(
                f"device {device!r} is not a device type; use cpu, cuda, cuda:N or mps",
                field="device",
                value=device,
            )
        return Hardware(kind, "", None, None, False)
    import torch

    if torch.cuda.is_available():
        return _cuda_hardware(torch.cuda.current_device(), True)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Hardware("mps", "Apple GPU", None, None, True)
    return _cpu_hardware(True)


def _torch_cuda_available() -> bool:
    """Whether CUDA devices may exist, without importing torch (then torch is asked)."""
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


# -- candidates ---------------------------------------------------------------------------------


def presets_of(backend: Backend) -> list[Preset]:
    """The backend's declared presets, or one per supported bit width from ``config.for_bits``."""
    if backend.presets:
        return list(backend.presets)
    out = []
    for bits in sorted(backend.capabilities.bits, reverse=True):
        try:
            config = backend.config.for_bits(bits)
        except (ConfigError, TypeError, ValueError):
            continue
        out.append(Preset(name=f"{bits}bit", config=config, bits=bits, note="derived from for_bits"))
    return out


@dataclasses.dataclass
class Candidate:
    """One ranked option: a backend and a concrete config, with its predictions and reasons."""

    backend: str
    preset: str
    config: QuantConfig
    bits: int
    bits_per_weight: float
    predicted_bytes: int
    fits: bool | None
    rel_error: float
    speed: float | None
    """Declared throughput vs 16-bit for the device and workload (None: not declared)."""
    score: float = 0.0
    rank: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.preset}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "backend": self.backend,
            "preset": self.preset,
            "config": self.config.to_dict(),
            "bits": self.bits,
            "bits_per_weight": self.bits_per_weight,
            "predicted_bytes": self.predicted_bytes,
            "fits": self.fits,
            "rel_error": self.rel_error,
            "speed": self.speed,
            "score": round(self.score, 4),
            "reasons": list(self.reasons),
        }


@dataclasses.dataclass
class Rejection:
    backend: str
    preset: str | None
    reason: str
    fix: str = ""
    predicted_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Selection:
    """What ``select`` returns: ranked candidates (best first), rejections, and the context."""

    hardware: Hardware
    model: ModelSize
    memory_budget: int | None
    workload: str
    priority: str
    finetune: bool
    calibration_data: bool
    candidates: list[Candidate]
    rejected: list[Rejection]
    notes: list[str]

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hardware": dataclasses.asdict(self.hardware),
            "model": {
                **{k: v for k, v in dataclasses.asdict(self.model).items() if k != "pre_quantized"},
                "pre_quantized": dict(self.model.pre_quantized) if self.model.pre_quantized else None,
                "unquantized_bytes": self.model.unquantized_bytes,
            },
            "memory_budget": self.memory_budget,
            "workload": self.workload,
            "priority": self.priority,
            "finetune": self.finetune,
            "calibration_data": self.calibration_data,
            "candidates": [c.to_dict() for c in self.candidates],
            "rejected": [r.to_dict() for r in self.rejected],
            "notes": list(self.notes),
        }

    def table(self, reasons_for: int = 3) -> str:
        """The ranking as text for a terminal: every candidate, the reasons of the first
        ``reasons_for`` (``to_dict()`` has them all), and the rejections grouped by backend."""
        lines = [f"device: {self.hardware.describe()}", f"model: {self.model.source}"]
        lines.append(
            f"unquantized: {fmt_bytes(self.model.unquantized_bytes)}"
            + (f"; budget: {fmt_bytes(self.memory_budget)}" if self.memory_budget else "")
            + f"; workload: {self.workload}; priority: {self.priority}"
            + ("; fine-tuning" if self.finetune else "")
        )
        lines += [f"note: {n}" for n in self.notes]
        lines.append("")
        if not self.candidates:
            lines.append("no candidate: every backend was rejected (see below)")
        for c in self.candidates:
            speed = f"{c.speed:.2g}x" if c.speed is not None else "?"
            lines.append(
                f"{c.rank:>2}. {c.label:<28} {fmt_bytes(c.predicted_bytes):>10}  "
                f"err~{c.rel_error:.3f}  speed {speed}"
            )
            if c.rank <= reasons_for:
                lines += [f"      - {r}" for r in c.reasons]
        if self.rejected:
            lines += ["", "rejected:"]
            grouped: dict[tuple[str, str, str], list[str]] = {}
            for r in self.rejected:  # one line per backend and reason
                reason = r.reason if not r.reason.startswith("over budget") else "over budget"
                grouped.setdefault((r.backend, reason, r.fix), []).append(r.preset or "")
            for (backend, reason, fix), names in grouped.items():
                if reason == "over budget":
                    sizes = {r.preset: r.predicted_bytes for r in self.rejected if r.backend == backend}
                    reason = "over budget: " + ", ".join(f"{n} {fmt_bytes(sizes.get(n))}" for n in names)
                    names = []
                total = sum(r.backend == backend for r in self.rejected) + sum(
                    c.backend == backend for c in self.candidates
                )
                every = len(names) == total
                what = f"{backend}:{','.join(n for n in names if n)}" if any(names) and not every else backend
                lines.append(f"  {what}: {reason}" + (f" (fix: {fix})" if fix else ""))
        return "\n".join(lines)


def _choice(value: str, allowed: Sequence[str], field: str) -> str:
    if value not in allowed:
        raise ConfigError(
            f"{field} {value!r} is not one of {', '.join(allowed)}",
            field=field,
            value=value,
            allowed=list(allowed),
        )
    return value


def _speed_for(preset: Preset, device: str, workload: str) -> float | None:
    figures = preset.speed.get(device)
    if not figures:
        return None
    if workload == "mixed":
        vals = [figures[w] for w in WORKLOADS if w in figures]
        return math.exp(sum(math.log(v) for v in vals) / len(vals)) if len(vals) == len(WORKLOADS) else None
    return figures.get(workload)


def _score(priority: str, err: float, size: int, speed: float) -> float:
    """Lower is better. Balanced: the sum of log error (floored), log size and -log speed, so a
    2x smaller model, a 2x faster one and one with half the error count the same."""
    e, s, v = math.log(max(err, ERROR_FLOOR)), math.log(max(size, 1)), math.log(speed)
    if priority == "quality":
        return e * 1e6 + s - v
    if priority == "size":
        return s * 1e6 + e - v
    if priority == "speed":
        return -v * 1e6 + e + s
    return e + s - v


def select(
    model: Any,
    *,
    device: Hardware | str | None = None,
    memory_budget: int | str | None = None,
    finetune: bool = False,
    calibration_data: bool = False,
    workload: Workload = "decode",
    priority: Priority = "balanced",
) -> Selection:
    """Rank every installed backend's presets for ``model`` on ``device``.

    ``model``: a parameter count (``7e9``), a model folder or its config.json, a Transformers
    config, or an ``nn.Module``. ``device``: ``cpu``/``cuda``/``mps`` (detected when None), or a
    ``Hardware`` (e.g. ``Hardware("cuda", cuda_capability=(8, 0))`` to plan for another machine).
    ``memory_budget``: bytes or ``"5GB"`` for the weights. ``finetune``: only backends declared
    trainable qualify. ``calibration_data``: whether you can provide calibration data.
    ``workload``: ``decode`` (token by token), ``prefill`` (long prompts, batch work) or
    ``mixed``. ``priority``: ``balanced``, ``quality``, ``size`` or ``speed``.
    Returns a ``Selection``; nothing is quantized and no backend library is imported.
    """
    workload = _choice(workload, ("decode", "prefill", "mixed"), "workload")
    priority = _choice(priority, PRIORITIES, "priority")
    budget = None
    if memory_budget is not None:
        try:
            budget = parse_size(memory_budget, "memory_budget")
        except ValueError as exc:
            raise ConfigError(str(exc), field="memory_budget", value=memory_budget) from None
    size = model_size(model)
    hw = detect_hardware(device)
    dev = hw.device
    notes: list[str] = []
    if not size.exact:
        notes.append(f"sizes are estimates: {size.source}")
    candidates: list[Candidate] = []
    rejected: list[Rejection] = []

    pre = size.pre_quantized
    pre_method = pre.get("quant_method") if isinstance(pre, Mapping) else None
    if pre_method is not None:
        notes.append(
            f"the checkpoint is already quantized with {pre_method!r}: its method decides; load it with "
            f"quantplug.load (re-quantizing needs the full-precision weights)"
        )

    registered = {b.name for b in _backends()}
    for backend in _backends():
        caps = backend.capabilities
        if pre_method is not None and backend.name != pre_method:
            rejected.append(
                Rejection(backend.name, None, f"the checkpoint is pre-quantized with {pre_method!r}")
            )
            continue
        if not backend.available:
            st = backend.status
            rejected.append(Rejection(backend.name, None, f"unavailable: {st.reason}", st.fix))
            continue
        presets = presets_of(backend)
        if pre_method is not None:
            try:
                config = backend.config.from_dict(dict(pre))
            except ConfigError as exc:
                rejected.append(
                    Rejection(backend.name, None, f"the checkpoint's quantization_config is invalid: {exc}")
                )
                continue
            bits = getattr(config, "bits", None)
            presets = [
                Preset(
                    name="checkpoint", config=config, bits=bits if isinstance(bits, int) else max(caps.bits)
                )
            ]
        for preset in presets:
            devices = preset.devices or caps.devices
            trainable = caps.trainable if preset.trainable is None else preset.trainable
            calib = caps.needs_calibration if preset.needs_calibration is None else preset.needs_calibration
            bpw = preset.bits_per_weight or preset.bits + ASSUMED_GROUP_OVERHEAD_BITS
            predicted = (
                size.checkpoint_bytes if (pre_method and size.checkpoint_bytes) else size.predicted_bytes(bpw)
            )

            def reject(
                reason: str, fix: str = "", name=backend.name, preset=preset, predicted=predicted
            ) -> None:
                rejected.append(Rejection(name, preset.name, reason, fix, predicted))

            if dev not in devices:
                reject(f"does not run on {dev} (runs on {', '.join(devices)})")
                continue
            need = preset.min_cuda_capability
            if dev == "cuda" and need is not None:
                have = hw.cuda_capability
                if have is None:
                    notes.append(
                        f"{backend.name}:{preset.name} needs CUDA compute capability >= {need[0]}.{need[1]}; "
                        f"the GPU's is unknown (not detected)"
                    )
                elif tuple(have) < tuple(need):
                    reject(
                        f"needs CUDA compute capability >= {need[0]}.{need[1]}; this GPU has {have[0]}.{have[1]}"
                    )
                    continue
            if finetune and not trainable:
                reject("not trainable: its plugin does not declare that adapters can be trained on it")
                continue
            if calib and not calibration_data:
                reject(
                    "needs calibration data",
                    "pass calibration_data=True (CLI: --calibration-data) if you have representative inputs",
                )
                continue
            fits = None if budget is None else predicted <= budget
            if fits is False:
                reject(f"over budget: predicted {fmt_bytes(predicted)} > {fmt_bytes(budget)}")
                continue
            try:
                config = preset.build(backend.config)
            except ConfigError as exc:
                reject(f"its config is invalid: {exc}")
                continue
            err = preset.rel_error if preset.rel_error is not None else caps.max_rel_error.get(preset.bits)
            err_declared = err is not None
            if err is None:
                err = 2.0 ** -(preset.bits - 1)  # one quantization step relative to the range
            speed = _speed_for(preset, dev, workload)
            reasons = []
            where = f"{dev} at {workload}"
            if speed is not None:
                reasons.append(
                    f"speed on {where}: {speed:.2g}x the unquantized model (declared by {backend.plugin or backend.name})"
                )
            else:
                reasons.append(
                    f"no speed figure declared for {where}: ranked as the slowest declared one (at most 1x); `quantplug compare` measures it"
                )
            reasons.append(
                f"quality: typical 1-layer error {err:.3f} ({_quality_word(err)}"
                + ("" if err_declared else ", guessed from the bit width")
                + ")"
            )
            bpw_text = f"{bpw:g} bits per weight" + ("" if preset.bits_per_weight else " (assumed)")
            size_text = f"predicted {fmt_bytes(predicted)} ({bpw_text}; {fmt_bytes(size.unquantized_bytes)} unquantized)"
            if budget is not None:
                size_text += f"; fits {fmt_bytes(budget)} with {fmt_bytes(budget - predicted)} to spare"
            reasons.append(size_text)
            if finetune:
                reasons.append("trainable: adapters (e.g. LoRA) can be trained on top of it")
            if calib:
                reasons.append("needs calibration data (you said you have some)")
            if preset.note:
                reasons.append(preset.note)
            candidates.append(
                Candidate(
                    backend=backend.name,
                    preset=preset.name,
                    config=config,
                    bits=preset.bits,
                    bits_per_weight=bpw,
                    predicted_bytes=predicted,
                    fits=fits,
                    rel_error=err,
                    speed=speed,
                    reasons=reasons,
                )
            )
    for method, dist in sorted(PLUGIN_FOR_METHOD.items(), key=lambda kv: kv[1]):
        if method not in registered and method == _canonical(method, dist) and pre_method in (None, method):
            rejected.append(Rejection(method, None, f"not installed (plugin {dist})", f"pip install {dist}"))

    known = [c.speed for c in candidates if c.speed is not None]
    # Unmeasured is not assumed fast: it ranks as the slowest declared figure, and never faster than
    # the unquantized model.
    neutral = min([*known, 1.0])
    for c in candidates:
        c.score = _score(
            priority, c.rel_error, c.predicted_bytes, c.speed if c.speed is not None else neutral
        )
    candidates.sort(key=lambda c: (c.score, c.predicted_bytes, c.label))
    for i, c in enumerate(candidates, 1):
        c.rank = i
        c.reasons.insert(0, _rank_reason(priority, i, c, candidates))
    if budget is not None and size.unquantized_bytes <= budget and pre_method is None:
        notes.append(
            f"the unquantized model ({fmt_bytes(size.unquantized_bytes)}) already fits the budget: "
            f"quantize only for speed or headroom"
        )
    declared = [c.speed for c in candidates if c.speed is not None]
    if declared and max(declared) < 1:
        notes.append(
            f"no candidate is declared faster than the unquantized model on {dev} at {workload}: "
            f"quantization buys memory here, not speed"
        )
    if finetune and not candidates:
        notes.append("no installed backend is declared trainable for this device")
    return Selection(
        hw, size, budget, workload, priority, finetune, calibration_data, candidates, rejected, notes
    )


def _canonical(method: str, dist: str) -> str:
    """The main quant_method of a plugin distribution (bitsandbytes, not bitsandbytes_4bit)."""
    names = [m for m, d in PLUGIN_FOR_METHOD.items() if d == dist]
    return min(names, key=len)


def _rank_reason(priority: str, rank: int, c: Candidate, all_: list[Candidate]) -> str:
    basis = {
        "balanced": "balances quality, size and speed (log error + log size - log speed)",
        "quality": "lowest error first, then size and speed",
        "size": "smallest first, then error and speed",
        "speed": "fastest (declared) first, then error and size",
    }[priority]
    if rank == 1:
        return f"ranked first for priority={priority}: {basis}"
    return f"ranked {rank} of {len(all_)} for priority={priority}"


# -- naming candidates ---------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """A candidate to measure: a label and a config."""

    label: str
    config: QuantConfig
    select_rank: int | None = None


def resolve(spec: Any) -> Spec:
    """A ``Spec`` from ``"backend:preset"``, ``"backend"`` (its first preset), a config object or a
    config dict. Raises ``ConfigError`` / ``UnknownMethodError`` naming what is wrong."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, str):
        name, _, preset = spec.partition(":")
        backend = get_backend(name.strip())
        presets = presets_of(backend)
        if not preset:
            if not presets:
                raise ConfigError(
                    f"backend {backend.name!r} declares no presets; give a config", field="candidates"
                )
            chosen = presets[0]
        else:
            found = [p for p in presets if p.name == preset.strip()]
            if not found:
                raise ConfigError(
                    f"backend {backend.name!r} has no preset {preset!r}; its presets: "
                    f"{', '.join(p.name for p in presets) or 'none'}",
                    field="candidates",
                    value=spec,
                    allowed=[f"{backend.name}:{p.name}" for p in presets],
                )
            chosen = found[0]
        return Spec(f"{backend.name}:{chosen.name}", chosen.build(backend.config))
    config = as_config(spec)
    return Spec(_config_label(config), config)


def _config_label(config: QuantConfig) -> str:
    backend = get_backend(config.quant_method)
    for p in presets_of(backend):
        try:
            if p.build(backend.config) == config:
                return f"{backend.name}:{p.name}"
        except ConfigError:
            continue
    defaults = type(config)().to_dict() if _constructible(type(config)) else {}
    changed = {
        k: v for k, v in config.to_dict().items() if defaults.get(k, object()) != v and k != "quant_method"
    }
    inner = ",".join(f"{k}={v}" for k, v in changed.items())
    return f"{config.quant_method}({inner})" if inner else config.quant_method


def _constructible(cls: type[QuantConfig]) -> bool:
    try:
        cls()
    except Exception:
        return False
    return True
