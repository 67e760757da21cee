"""``AwqConfig``: reading AWQ checkpoints (``quant_method: awq``), with the keys of Transformers'
``AwqConfig`` and of what AutoAWQ / GPTQModel / auto-round write. Light: no torch, no gptqmodel.

quantplug-gptqmodel loads AWQ's ``gemm`` layout on every device; it does not quantize with AWQ
(GPTQModel's AWQ quantizer is CUDA-only, and not wired in here): the quantizer says so by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import quantplug

_OMIT_WHEN_NULL = frozenset(
    {
        "version",
        "backend",
        "do_fuse",
        "fuse_max_seq_len",
        "modules_to_fuse",
        "exllama_config",
        "meta",
        "checkpoint_format",
        "sym",
        "provider",
        "autoround_version",
        "data_type",
        "iters",
        "nsamples",
        "seqlen",
        "to_quant_block_names",
    }
)


#: keys Transformers' AwqConfig inherits from its GPTQConfig: calibration settings of GPTQ
_INHERITED_GPTQ_KEYS = frozenset(
    {
        "act_group_aware",
        "batch_size",
        "block_name_to_quantize",
        "cache_block_outputs",
        "damp_percent",
        "dataset",
        "max_input_length",
        "model_seqlen",
        "module_name_preceding_first_block",
        "modules_in_block_to_quantize",
        "pad_token_id",
        "tokenizer",
        "true_sequential",
    }
)


@dataclasses.dataclass(frozen=True)
class AwqConfig(quantplug.QuantConfig):
    """AWQ (activation-aware weight quantization) checkpoints in the ``gemm`` layout.

    bits          4 (what AWQ's gemm layout and its kernels store)
    group_size    input columns per scale/zero (a positive power of two, or -1)
    zero_point    asymmetric (stored zero points), as AWQ writes by default
    format        "gemm" (``version`` is its older name); "gemv" and the other layouts are refused
    """

    quant_method = "awq"
    skip_rules: ClassVar[tuple[str, ...]] = ("components", "transformers")

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    format: Literal["gemm", "gemv", "gemv_fast", "llm-awq"] = "gemm"
    version: Literal["gemm", "gemv", "gemv_fast", "llm-awq", "GEMM", "GEMV"] | None = None
    # -- written by Transformers / AutoAWQ / GPTQModel; they do not change the stored weights ------
    backend: str | None = None
    do_fuse: bool | None = None
    fuse_max_seq_len: int | None = None
    modules_to_fuse: dict[str, Any] | None = None
    exllama_config: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    checkpoint_format: str | None = None
    sym: bool | None = None  # kept as written: zero_point decides (Transformers' AwqConfig writes sym=True)
    desc_act: bool = False
    pack_dtype: Literal["int32"] = "int32"
    # auto-round's record of how it quantized (``quantize_and_save(format="auto_awq")``)
    provider: str | None = None
    autoround_version: str | None = None
    data_type: Literal["int"] | None = None
    iters: int | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    to_quant_block_names: str | tuple[str, ...] | None = None

    def validate(self) -> None:
        if self.version is not None:
            version = self.version.lower()
            if self.format != "gemm" and self.format != version:
                raise self.invalid(
                    "version", f"the same as format ({self.format!r}), or null", "it is format's older name"
                )
            object.__setattr__(self, "format", version)
            object.__setattr__(self, "version", version)
        if self.bits != 4:
            raise self.invalid("bits", "4 (AWQ's gemm layout)")
        if self.group_size != -1 and not (
            self.group_size > 0 and self.group_size & (self.group_size - 1) == 0
        ):
            raise self.invalid("group_size", "-1 or a positive power of two, e.g. 128")
        if self.format != "gemm":
            raise self.invalid(
                "format",
                "'gemm'",
                f"quantplug-gptqmodel reads AWQ's gemm layout only; load a {self.format} checkpoint with its own "
                f"library (AutoAWQ / GPTQModel)",
            )
        if self.desc_act:
            raise self.invalid("desc_act", "false", "AWQ checkpoints have no act-order")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not (v is None and k in _OMIT_WHEN_NULL)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AwqConfig:
        """Also reads Transformers' ``AwqConfig.to_dict()``, which carries the GPTQ calibration settings
        its class inherits (``damp_percent``, ``dataset``, ...): they say nothing about stored AWQ
        weights, and are dropped."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in _INHERITED_GPTQ_KEYS}
        return super().from_dict(data)

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> AwqConfig:
        return cls(bits=bits, **overrides)
