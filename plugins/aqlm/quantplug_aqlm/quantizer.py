"""``AqlmQuantizer``: load and save AQLM layers in Transformers' / aqlm's exact layout (``codes``,
``codebooks``, ``scales``, ``bias``); quantizing is refused with the reason."""

from __future__ import annotations

import torch
from torch import nn

import quantplug

from .config import AqlmConfig
from .modules import AqlmLinear, codes_dtype

REFUSAL = (
    "quantplug-aqlm loads AQLM checkpoints but does not quantize: AQLM learns its codebooks and codes by "
    "beam search and fine-tuning on calibration data, about one A100-day for a 7B model (AQLM's README), "
    "with the authors' repository (github.com/Vahe1994/AQLM, main.py), which the aqlm pip package does not "
    "contain. Quantize there (main.py, then convert_to_hf.py) and load the result with quantplug.load(folder), "
    "or load one of the published AQLM checkpoints (ISTA-DASLab/*-AQLM-*); to quantize here, pick a backend "
    "that quantizes (`quantplug select`; {{'quant_method': 'gptq'}} for a calibrated 2-4-bit model). "
    "Layer {name!r} was left as it was."
)


class AqlmQuantizer(quantplug.Quantizer):
    config: AqlmConfig

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        raise quantplug.BackendUnavailableError(REFUSAL.format(name=name))

    def needs_calibration(self) -> bool:
        return False  # loading needs no data; quantizing is refused in quantize_module

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        cfg = self.config
        in_f, out_f = module.in_features, module.out_features
        if in_f % cfg.in_group_size or out_f % cfg.out_group_size:
            return (
                f"[{out_f}, {in_f}] does not split into AQLM groups of {cfg.out_group_size} x "
                f"{cfg.in_group_size} (aqlm's QuantizedLinear cannot hold it)"
            )
        return None

    # -- the layout ---------------------------------------------------------------------------------

    def empty_module(self, name: str, module: nn.Linear) -> AqlmLinear:
        cfg = self.config
        return AqlmLinear(
            module.in_features,
            module.out_features,
            in_group_size=cfg.in_group_size,
            out_group_size=cfg.out_group_size,
            num_codebooks=cfg.num_codebooks,
            nbits_per_codebook=cfg.nbits_per_codebook,
            bias=module.bias is not None,
            device="meta",
            dtype=module.weight.dtype,
        )

    def expected_tensors(self, name: str, module: nn.Linear):
        """Shapes and the codes' dtype are fixed; the float tensors may be stored in any float dtype
        (AQLM checkpoints store float16 codebooks and scales whatever the model's dtype) and are kept
        as stored, so a save writes them back unchanged."""
        spec = {k: (tuple(t.shape), None) for k, t in self.empty_module(name, module).state_dict().items()}
        spec["codes"] = (spec["codes"][0], codes_dtype(self.config.nbits_per_codebook))
        return spec

    def load_module(self, name: str, module: nn.Linear, tensors: dict[str, torch.Tensor]) -> AqlmLinear:
        spec = self.expected_tensors(name, module)
        missing = sorted(set(spec) - set(tensors))
        if missing or set(tensors) - set(spec):
            raise quantplug.CheckpointError(
                f"layer {name!r}: AQLM stores {sorted(spec)}, got {sorted(tensors)}"
                + (f" (missing {missing})" if missing else "")
            )
        for key, (shape, dtype) in spec.items():
            t, where = tensors[key], f"tensor {name + '.' + key!r}"
            if tuple(t.shape) != shape:
                why = self.explain_stored_layout(
                    name, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
                )
                raise quantplug.CheckpointError(
                    f"{where} has shape {list(t.shape)}, expected {list(shape)} for {self._what(module)}"
                    + (f": {why}" if why else "")
                )
            if dtype is not None and t.dtype != dtype:
                raise quantplug.CheckpointError(
                    f"{where} has dtype {t.dtype}, expected {dtype}: {self._codes_dtype_reason()}"
                )
            if dtype is None and not t.dtype.is_floating_point:
                raise quantplug.CheckpointError(
                    f"{where} has dtype {t.dtype}; AQLM stores {key} as floats (float16 in published checkpoints)"
                )
        layer = self.empty_module(name, module)
        for key, t in tensors.items():  # the stored tensors themselves: a save writes the same bytes
            setattr(layer, key, nn.Parameter(t, requires_grad=False))
        return layer

    def module_tensors(self, name: str, qmodule: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in qmodule.state_dict().items()}

    def _what(self, module: nn.Linear) -> str:
        cfg = self.config
        return (
            f"a [{module.out_features}, {module.in_features}] layer with {cfg.scheme} codebooks and groups of "
            f"{cfg.out_group_size} x {cfg.in_group_size} (config.json's quantization_config)"
        )

    def _codes_dtype_reason(self) -> str:
        nbits = self.config.nbits_per_codebook
        return (
            f"aqlm stores the codes of {nbits}-bit codebooks as {codes_dtype(nbits)} (int8 up to 8 bits, int16 up "
            f"to 16); does config.json's nbits_per_codebook ({nbits}) match the checkpoint?"
        )

    def explain_stored_layout(self, name: str, stored: dict) -> str | None:
        cfg = self.config
        codes = stored.get("codes")
        if codes is not None and codes[1] != codes_dtype(cfg.nbits_per_codebook):
            return self._codes_dtype_reason()
        if codes is not None and len(codes[0]) == 3:
            groups_in, groups_out, k = codes[0]
            scales = stored.get("scales")
            out_groups = scales[0][0] if scales is not None and len(scales[0]) == 4 else None
            if out_groups is not None and groups_out == out_groups and groups_in != out_groups:
                return (
                    "codes is [in_groups, out_groups, num_codebooks], transposed: the layout aqlm's CPU kernel "
                    "rewrites codes into, in place, on its first forward with 8-bit codebooks (aqlm 1.1.7, "
                    "QuantizedLinear.prepare_matmul_op), so a model saved after running it on CPU holds it. "
                    "Load the checkpoint as it was published instead"
                )
            if k != cfg.num_codebooks:
                return f"its last dimension is the number of codebooks, {k}, where config.json says {cfg.num_codebooks}"
        books = stored.get("codebooks")
        expected = (cfg.num_codebooks, 2**cfg.nbits_per_codebook, cfg.out_group_size, cfg.in_group_size)
        if books is not None and len(books[0]) == 4 and tuple(books[0]) != expected:
            k, size, ogs, igs = books[0]
            return (
                f"codebooks [{k}, {size}, {ogs}, {igs}] are {k} codebook(s) of {size} vectors of {ogs} x {igs}; "
                f"config.json says {cfg.num_codebooks} of {2**cfg.nbits_per_codebook} vectors of "
                f"{cfg.out_group_size} x {cfg.in_group_size}"
            )
        return None

    def integer_grid(self, name: str, qmodule: nn.Module):
        return "AQLM weights are sums of learned codebook vectors, not integers on a grid of scales"
