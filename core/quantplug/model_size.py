"""How big a model is: the weights a quantization would convert and what stays in full precision,
from a parameter count, a Transformers config (dict or object), a model folder's safetensors headers,
or an ``nn.Module``. Nothing here imports torch unless it is given a module (then torch is loaded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError
from .safetensors_header import DTYPE_SIZES, read_header

#: With only a parameter count, the share of parameters assumed to stay unquantized (embeddings,
#: output head, norms): 3.9% in Llama-2-7B (2 x 131M of 6.74B). Pass a model, its folder or its
#: config for an exact split.
ASSUMED_UNQUANTIZED_SHARE = 0.04


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
    model_type: str | None = None
    """Transformers' ``config.model_type`` (None: not known, e.g. from a parameter count)."""

    @property
    def total_params(self) -> int:
        return self.quantizable_params + self.other_params

    @property
    def unquantized_bytes(self) -> int:
        return int(self.total_params * self.dtype_bytes)

    def predicted_bytes(self, bits_per_weight: float) -> int:
        return int(self.quantizable_params * bits_per_weight / 8 + self.other_params * self.dtype_bytes)


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


# -- a parameter count ----------------------------------------------------------------------------


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


# -- a config's dimensions ------------------------------------------------------------------------


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
        model_type=cfg.get("model_type"),
    )


def _dtype_bytes(name: Any) -> float:
    return {"float32": 4.0, "float64": 8.0, "float16": 2.0, "bfloat16": 2.0}.get(str(name), 2.0)


# -- a model folder -------------------------------------------------------------------------------


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
    tensors = _safetensors_tensors(folder)
    if not tensors:
        return _from_config_dict(cfg, str(cfg_file))
    quantizable = other = 0
    checkpoint_bytes = 0
    dtype_counts: dict[float, int] = {}
    moe = any(".experts." in k for k in tensors)
    for key, (dtype, shape) in tensors.items():
        numel = math.prod(shape)
        size = DTYPE_SIZES[dtype]
        checkpoint_bytes += numel * size
        if _is_weight(key, shape, moe) and not _is_embedding_or_head(key):
            quantizable += numel
            dtype_counts[float(size)] = dtype_counts.get(float(size), 0) + numel
        else:
            other += numel
    dtype_bytes = max(dtype_counts, key=dtype_counts.get) if dtype_counts else 2.0
    return ModelSize(
        quantizable_params=quantizable,
        other_params=other,
        dtype_bytes=dtype_bytes,
        source=(
            f"{folder} (safetensors headers: 2-D weights and stacked experts, but embeddings, the output "
            f"head{' and MoE routers' if moe else ''})"
        ),
        exact=True,
        pre_quantized=cfg.get("quantization_config"),
        checkpoint_bytes=checkpoint_bytes,
        model_type=cfg.get("model_type"),
    )


def _safetensors_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's dtype name and shape from the folder's safetensors headers (headers only)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            header = read_header(file)
        except CheckpointError as exc:
            raise ConfigError(f"cannot size the model: {exc}", field="model", value=str(file)) from None
        out.update({name: (dtype, shape) for name, (dtype, shape, _, _) in header.entries.items()})
    return out


def _is_weight(key: str, shape: tuple[int, ...], moe: bool) -> bool:
    """A weight quantization converts: a 2-D ``*.weight`` or a stacked 3-D experts tensor, but not
    an MoE router (``mlp.gate`` / ``router``: full precision by default, as the field keeps them)."""
    if moe and key.endswith((".gate.weight", ".router.weight")):
        return False
    if len(shape) == 3:
        return ".experts." in key and not key.endswith("_bias")
    return len(shape) == 2 and key.endswith(".weight")


def _is_embedding_or_head(key: str) -> bool:
    parts = key.lower().split(".")
    return any(p.startswith(("embed", "wte", "wpe", "lm_head", "output")) for p in parts[:-1])


# -- a module -------------------------------------------------------------------------------------


def _from_module(model: Any) -> ModelSize:
    from .experts import stacked_weights
    from .layers import default_targets  # torch is already imported: we hold a model
    from .walk import quantized_info

    targets = default_targets(model)
    quantizable = sum(m.weight.numel() for _, m in targets)
    quantizable += sum(t.numel() for ts in stacked_weights(model).values() for t in ts)
    bytes_per = float(targets[-1][1].weight.element_size()) if targets else 2.0
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters counted once
    info = quantized_info(model)
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
        model_type=getattr(hf, "model_type", None),
    )
