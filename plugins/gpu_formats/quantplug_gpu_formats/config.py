"""The configs of ``spqr``, ``higgs`` and ``eetq``, with Transformers' exact keys
(``transformers.utils.quantization_config``: ``SpQRConfig``, ``HiggsConfig``, ``EetqConfig``), so a
checkpoint's ``quantization_config`` reads here as it reads there. Light: imports no torch.

Each config accepts what Transformers' accepts and refuses the rest with a ``ConfigError`` naming
the field; the checks are as cheap as Transformers' ``post_init``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import quantplug

#: the tensors each SpQR layer stores, whose lengths ``SpQRConfig.shapes`` gives ("<module>.<key>.shape")
SPQR_TENSORS = ("dense_weights", "row_offsets", "col_vals", "in_perm")


@dataclasses.dataclass(frozen=True)
class SpQRConfig(quantplug.QuantConfig):
    """SpQR (``quant_method: "spqr"``), as Transformers' ``SpQRConfig``.

    bits    3: the only width SpQR's kernels (spqr-quant) and Transformers accept
    beta1   16: the tile width (the only one accepted)
    beta2   16: the tile height (the only one accepted)
    shapes  the length of every stored tensor, ``{"<module>.<tensor>.shape": n}`` with ``<tensor>``
            one of dense_weights, row_offsets, col_vals, in_perm (Transformers cannot derive them
            from bits and tiles: the outlier count differs per layer)
    """

    quant_method = "spqr"

    bits: Literal[3] = 3
    beta1: Literal[16] = 16
    beta2: Literal[16] = 16
    shapes: dict[str, Any] | None = None

    def validate(self) -> None:
        for key, value in (self.shapes or {}).items():
            module, _, rest = key.rpartition(".shape")[0].rpartition(".")
            if not key.endswith(".shape") or not module or rest not in SPQR_TENSORS:
                raise self.invalid(
                    "shapes",
                    'keys "<module>.<tensor>.shape" with <tensor> one of ' + ", ".join(SPQR_TENSORS),
                    why=f"key {key!r}",
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self.invalid("shapes", "non-negative integer lengths", why=f"{key!r}: {value!r}")


@dataclasses.dataclass(frozen=True)
class HiggsConfig(quantplug.QuantConfig):
    """HIGGS (``quant_method: "higgs"``), as Transformers' ``HiggsConfig``.

    bits           2, 3 or 4 bits per weight
    p              1 or 2: the dimension of the grid (2: pairs of weights share one code)
    hadamard_size  inputs rotated together by the Hadamard transform (the input is padded to it)
    group_size     64, 128 or 256 weights per scale; divides ``hadamard_size``
    tune_metadata  FLUTE's per-module kernel tuning ({module: {M, N, K, num_sms, template_id, ...}}),
                   written by the GPU that quantized the model
    """

    quant_method = "higgs"

    bits: Literal[2, 3, 4] = 4
    p: Literal[1, 2] = 2
    hadamard_size: int = 512
    group_size: Literal[64, 128, 256] = 256
    tune_metadata: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.hadamard_size < 1 or self.hadamard_size % self.group_size:
            raise self.invalid(
                "hadamard_size",
                f"a positive multiple of group_size ({self.group_size})",
                why="Transformers requires hadamard_size to be divisible by group_size",
            )
        for module, meta in (self.tune_metadata or {}).items():
            if not isinstance(meta, dict):
                raise self.invalid(
                    "tune_metadata",
                    "a mapping of module names to FLUTE's metadata objects",
                    why=f"{module!r}",
                )

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> HiggsConfig:
        return cls(bits=bits, **overrides)


@dataclasses.dataclass(frozen=True)
class EetqConfig(quantplug.QuantConfig):
    """EETQ (``quant_method: "eetq"``), as Transformers' ``EetqConfig``.

    weights  "int8": int8 weight-only, symmetric, one scale per output channel (the only type EETQ has)
    """

    quant_method = "eetq"

    weights: Literal["int8"] = "int8"

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> EetqConfig:
        if bits != 8:
            raise quantplug.ConfigError(
                f"EetqConfig: EETQ stores int8 weights only, not {bits}-bit ones",
                field="weights",
                value=bits,
                allowed="8 bits (weights='int8')",
            )
        return cls(**overrides)
