"""``VptqQuantizer``: loads VPTQ layers (``VptqLinear``) from checkpoints; quantizing is refused.

Each planned Linear takes its settings from ``config_for_layers`` (else one matching
``shared_layer_config`` key); a layer with neither, or settings that do not fit its shape, is a
``ConfigError`` naming the layer. The stored tensors are checked (dtypes and shapes by the core
against ``expected_tensors``; here: float tensors are floats, the permutation is one, outlier
indices are in range) and kept as they are, so a save writes the same bytes.
"""

from __future__ import annotations

import torch
from torch import nn

import quantplug

from .config import LayerSpec, VptqConfig, spec_of
from .layer import VptqLinear

REFUSAL = (
    "quantplug-vptq does not quantize: VPTQ quantizes with Hessians collected on calibration data and "
    "a GPU k-means/optimization that live in the authors' research repository (microsoft/VPTQ), not in "
    "the vptq package. It loads VPTQ checkpoints (quantplug.load(folder), e.g. VPTQ-community's); to "
    "quantize here, pick another backend (`quantplug select`)."
)

FLOATS = (
    "centroids.weight",
    "res_centroids.weight",
    "outlier_centroids.weight",
    "weight_scale",
    "weight_bias",
    "bias",
)


class VptqQuantizer(quantplug.Quantizer):
    config: VptqConfig

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        raise quantplug.BackendUnavailableError(f"{name}: {REFUSAL}")

    def needs_calibration(self) -> bool:
        return False  # loading needs no data; quantizing is refused in quantize_module

    def spec(self, name: str, module: nn.Linear) -> LayerSpec:
        """Layer ``name``'s settings, checked against its shape (``ConfigError`` naming the layer)."""
        found = self.config.layer_entry(name)
        if found is None:
            raise quantplug.ConfigError(
                f"VptqConfig: layer {name!r} has no entry in config_for_layers, and no shared_layer_config key "
                f"matches it: VPTQ stores each quantized layer with its own settings. If the checkpoint keeps "
                f"{name!r} in full precision, add it to modules_to_not_convert; otherwise this config.json does "
                f"not belong to these weights.",
                field="config_for_layers",
                value=name,
                allowed="an entry for every quantized Linear",
            )
        field, key, entry = found
        spec = spec_of(entry)
        i, o = module.in_features, module.out_features
        for what, given, actual in (
            ("in_features", spec.in_features, i),
            ("out_features", spec.out_features, o),
        ):
            if given not in (-1, actual):
                raise self.config.entry_error(field, key, what, f"={given} but layer {name!r} has {actual}")
        if spec.bias is not None and spec.bias != (module.bias is not None):
            has = "has" if module.bias is not None else "has no"
            raise self.config.entry_error(field, key, "bias", f"={spec.bias} but layer {name!r} {has} bias")
        if spec.width() != i:
            outl = f" + outlier_size {spec.outlier_size}" if spec.outliers else ""
            raise self.config.entry_error(
                field,
                key,
                "group_num",
                f"x group_size ({spec.group_num} x {spec.group_size}){outl} = {spec.width()} must equal "
                f"layer {name!r}'s in_features {i}",
            )
        return spec

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        spec = self.spec(name, module)
        return VptqLinear(
            module.in_features,
            module.out_features,
            spec,
            bias=module.bias is not None,
            dtype=module.weight.dtype,
            device="meta",
        )

    def expected_tensors(self, name: str, module: nn.Linear):
        """VQuantLinear's keys and shapes; integer tensors exactly (int32 indices, int16 perm and
        outlier indices), float ones in any float dtype (kept as stored; checked in load_module)."""
        out = {k: (tuple(t.shape), t.dtype) for k, t in self.empty_module(name, module).state_dict().items()}
        return {k: (shape, None if k in FLOATS else dt) for k, (shape, dt) in out.items()}

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        layer = self.empty_module(name, module)
        for key in FLOATS:
            t = tensors.get(key)
            if t is not None and not t.is_floating_point():
                raise quantplug.CheckpointError(
                    f"{name}.{key}: stored as {t.dtype}, expected a float dtype (the model's): the checkpoint "
                    f"is damaged or not VPTQ's"
                )
        _check_perm(name, tensors.get("perm"), module.in_features)
        _check_outliers(name, tensors.get("outlier_indices"), layer.spec)
        layer.load_state_dict(tensors, strict=True, assign=True)
        return layer.requires_grad_(False)

    def explain_stored_layout(self, name: str, stored: dict) -> str | None:
        indices = stored.get("indices")
        if indices is not None and indices[1] in (torch.int16, torch.float16):
            return (
                "its indices are unpacked (VPTQ's is_indice_packed=false: int16 indices, and res_indices): "
                "pack them with vptq.utils.pack.pack_index, as VPTQ's releases and Transformers store them"
            )
        return None


def _check_perm(name: str, perm: torch.Tensor | None, n: int) -> None:
    """A stored ``perm`` (uint16 values in int16) must be a permutation of range(in_features):
    VPTQ's argsort of anything else scrambles the weight's columns without an error."""
    if perm is None:
        return
    values = perm.to(torch.int64) & 0xFFFF
    if not torch.equal(torch.sort(values).values, torch.arange(n, device=values.device)):
        raise quantplug.CheckpointError(
            f"{name}.perm: not a permutation of 0..{n - 1} (read as uint16): the checkpoint is damaged"
        )


def _check_outliers(name: str, idx: torch.Tensor | None, spec: LayerSpec) -> None:
    if idx is None or idx.numel() == 0:
        return
    top = int((idx.to(torch.int64) & 0xFFFF).max())
    if top >= spec.outlier_num_centroids:
        raise quantplug.CheckpointError(
            f"{name}.outlier_indices: holds index {top}, but the layer has {spec.outlier_num_centroids} outlier "
            f"centroids (config num_centroids[0]): the checkpoint is damaged or its config is not this one's"
        )
