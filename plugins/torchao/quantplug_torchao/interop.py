"""Make a quantplug torchao checkpoint loadable by Transformers' own torchao path.

Transformers (5.x) rebuilds torchao tensor subclasses from per-tensor JSON in the safetensors
header (torchao's ``flatten_tensor_state_dict`` metadata: ``"<layer>.weight": {"_type":
"Int8Tensor", "_data": {...}}`` and ``"tensor_names": [...]``) and refuses a torchao checkpoint
without it. quantplug's ``save`` writes the same tensors and ``config.json`` but, today, only its
own header metadata: the core has no hook for a backend to add header entries (the report of this
plugin proposes one). Until it has, ``add_transformers_metadata`` adds them to a saved checkpoint:

    quantplug.save(model, "out")
    quantplug_torchao.add_transformers_metadata("out", model)   # or without model: loads "out" first
    AutoModelForCausalLM.from_pretrained("out")                  # Transformers' TorchAoHfQuantizer

Each safetensors file is rewritten (to a temporary file, then renamed over the original), keeping its
tensors and quantplug's metadata. quantplug itself never reads these entries: it rebuilds the
subclasses from the config.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import quantplug

from .quantizer import TorchaoLinear, subclass_metadata


def torchao_metadata(model: nn.Module) -> dict[str, str]:
    """torchao's safetensors metadata for every quantized layer of ``model`` (plus ``tensor_names``)."""
    meta = {
        f"{name}.weight": subclass_metadata(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, TorchaoLinear)
    }
    if not meta:
        raise quantplug.CheckpointError("the model has no torchao-quantized layer; nothing to describe")
    meta["tensor_names"] = json.dumps(sorted(meta))
    return meta


def _files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / n for n in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise quantplug.CheckpointError(f"{folder} holds no model.safetensors or model.safetensors.index.json")


def add_transformers_metadata(path: str | os.PathLike, model: nn.Module | None = None) -> Path:
    """Add torchao's per-tensor header metadata to the quantplug torchao checkpoint at ``path`` so
    that ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads it. ``model`` is the
    quantized model that was saved there; without it the checkpoint is loaded with quantplug first."""
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if config.get("quant_method") != "torchao":
        raise quantplug.CheckpointError(
            f"{folder}: quantization_config.quant_method is {config.get('quant_method')!r}, not 'torchao'"
        )
    if model is None:
        model = quantplug.load(folder, progress=False)
    extra = torchao_metadata(model)
    for file in _files(folder):
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        for key in extra:
            if key == "tensor_names":
                continue
            layer = key[: -len(".weight")]
            if layer + ".weight" in tensors:
                raise quantplug.CheckpointError(
                    f"{file}: {layer} is stored unquantized, but the model has it quantized; "
                    f"pass the model that was saved there"
                )
        meta.update(extra)
        tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
    return folder
