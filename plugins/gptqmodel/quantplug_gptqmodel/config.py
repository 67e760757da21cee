"""``GptqConfig``: GPTQ settings with the keys of Transformers' ``GPTQConfig`` and of the
``quantization_config`` GPTQModel / AutoGPTQ / optimum write into ``config.json``.

Light: imports neither torch nor gptqmodel. A hub checkpoint's ``quantization_config`` parses as
it is; every key either changes what quantplug does (and is honoured) or is calibration-time
bookkeeping that changes nothing about the stored weights (and is kept, so a re-save writes it
back). A key that would change the weights in a way quantplug does not implement (per-layer
``dynamic`` bits, a quantized ``lm_head``, a pack dtype other than int32, a ``data_type`` other
than int) is refused by name, never ignored. Keys other tools add that are not fields here
(auto-round's ``autoround_version``, ``provider``, ``iters``, ...) are kept as they are when the
config is read from a checkpoint (``QuantConfig.from_checkpoint``) and written back on save.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import quantplug

#: what GPTQ's packed layout stores: 2, 3, 4 and 8 bits (gptqmodel's torch kernel reads all four)
GPTQ_BITS = (2, 3, 4, 8)


_OMIT_WHEN_NULL = frozenset(
    {
        "meta",
        "backend",
        "model_seqlen",
        "module_name_preceding_first_block",
        "pad_token_id",
        "max_input_length",
        "use_cuda_fp16",
        "use_exllama",
        "exllama_config",
        "method",
        "dynamic",
        "tokenizer",
        "dataset",
        "block_name_to_quantize",
    }
)


@dataclasses.dataclass(frozen=True)
class GptqConfig(quantplug.QuantConfig):
    """GPTQ (Frantar et al. 2022) through GPTQModel: weights rounded one column at a time while the
    error is pushed onto the columns not yet rounded, using the Hessian of each layer's inputs
    (calibration data). Fields are Transformers' ``GPTQConfig``'s.

    bits                    2, 3, 4 or 8
    group_size              input columns per scale/zero (-1: one per output row)
    sym                     symmetric (zero point fixed at the middle code) or asymmetric
    desc_act                act-order: quantize columns in order of decreasing Hessian diagonal
                            (stores a ``g_idx``; usually more accurate, slower kernels on GPU)
    act_group_aware         GPTQModel's group-aware reordering (only without desc_act)
    damp_percent            Hessian dampening, a fraction of its mean diagonal
    damp_auto_increment     added to damp_percent until the Hessian is positive definite
    static_groups           with desc_act: scales/zeros from the unpermuted groups
    true_sequential         calibrate each layer of a block on the outputs of the layers already
                            quantized in it (False: a block's layers together; faster)
    format                  checkpoint layout: "gptq" (v1: zero points stored minus one; what
                            Transformers, vLLM and AutoGPTQ read) or "gptq_v2" (GPTQModel's)
    checkpoint_format       the same setting under its older name (Transformers writes both)
    block_name_to_quantize  the repeated blocks to calibrate one after another (e.g.
                            "model.layers"); null: the module list holding most quantized layers
    modules_in_block_to_quantize  only these layer names (within a block) are quantized
    """

    quant_method = "gptq"
    skip_rules: ClassVar[tuple[str, ...]] = ("components", "transformers")

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    act_group_aware: bool = True
    damp_percent: float = 0.1
    damp_auto_increment: float = 0.0025
    static_groups: bool = False
    true_sequential: bool = True
    format: Literal["gptq", "gptq_v2"] = "gptq"
    checkpoint_format: Literal["gptq", "gptq_v2"] | None = None
    block_name_to_quantize: str | None = None
    modules_in_block_to_quantize: tuple[tuple[str, ...], ...] | None = None
    # -- written by Transformers / GPTQModel, kept as given; they do not change stored weights ----
    meta: dict[str, Any] | None = None
    backend: str | None = None
    model_seqlen: int | None = None
    module_name_preceding_first_block: tuple[str, ...] | None = None
    batch_size: int = 1
    pad_token_id: int | None = None
    max_input_length: int | None = None
    cache_block_outputs: bool = True
    use_cuda_fp16: bool | None = None
    use_exllama: bool | None = None
    exllama_config: dict[str, Any] | None = None
    method: Literal["gptq"] | None = None
    mse: float = 0.0
    # -- settings that would change the weights in ways this plugin does not implement ----------
    # (``dynamic`` is honoured when it only excludes layers: '-:<regex>' keys, GPTQModel's matching)
    dynamic: dict[str, Any] | None = None
    lm_head: bool = False
    pack_dtype: Literal["int32"] = "int32"
    tokenizer: Any = None
    dataset: Any = None

    @property
    def checkpoint_layout(self) -> str:
        """ "gptq" or "gptq_v2": how zero points are stored in the checkpoint."""
        return self.format

    @property
    def group_aware_order(self) -> bool:
        """Whether GPTQModel's group-aware reordering runs: asked for, without act-order, with groups."""
        return self.act_group_aware and not self.desc_act and self.group_size > 0

    def validate(self) -> None:
        if self.bits not in GPTQ_BITS:
            raise self.invalid("bits", f"one of {list(GPTQ_BITS)} (GPTQ's packed layout)")
        if self.group_size != -1 and not (self.group_size > 0 and self.group_size % 8 == 0):
            raise self.invalid("group_size", "-1 (one group per row) or a positive multiple of 8, e.g. 128")
        if not 0 < self.damp_percent < 1:
            raise self.invalid("damp_percent", "a number between 0 and 1 (exclusive), e.g. 0.1")
        if not 0 <= self.damp_auto_increment < 1:
            raise self.invalid("damp_auto_increment", "a number in [0, 1)")
        if self.checkpoint_format is not None and self.checkpoint_format != self.format:
            if self.format != "gptq":  # both given and different
                raise self.invalid(
                    "checkpoint_format",
                    f"the same as format ({self.format!r}), or null",
                    "it is the older name of format",
                )
            object.__setattr__(self, "format", self.checkpoint_format)
        object.__setattr__(self, "checkpoint_format", self.format)
        if self.dynamic and not all(isinstance(k, str) and k.startswith("-:") for k in self.dynamic):
            raise self.invalid(
                "dynamic",
                "null, {} or exclusions only ('-:<regex>' keys, as auto-round writes for MoE routers)",
                "per-layer overrides of bits/group size (GPTQModel's `dynamic`) are not supported by "
                "quantplug-gptqmodel; load this checkpoint with GPTQModel itself",
            )
        if self.lm_head:
            raise self.invalid(
                "lm_head",
                "false",
                "a quantized output head is not supported by quantplug-gptqmodel; load this checkpoint "
                "with GPTQModel itself",
            )
        if self.tokenizer is not None or self.dataset is not None:
            field = "tokenizer" if self.tokenizer is not None else "dataset"
            raise self.invalid(
                field,
                "null",
                "quantplug takes calibration data as quantplug.quantize(model, config, "
                "calibration_data=[token-id tensors]), not from the config",
            )
        data_type = self.extra.get("data_type", "int")  # auto-round's export records it
        if data_type != "int":
            raise quantplug.ConfigError(
                f"{type(self).__name__}: data_type={data_type!r} is not supported: GPTQ's packed layout "
                f"stores integer weights (data_type 'int'); load this checkpoint with the library that wrote it",
                field="data_type",
                value=data_type,
                allowed=["int"],
            )
        blocks = self.modules_in_block_to_quantize
        if blocks is not None and not all(blocks):
            raise self.invalid("modules_in_block_to_quantize", "a list of non-empty lists of layer names")

    def to_dict(self) -> dict[str, Any]:
        """``config.json``'s ``quantization_config``: bookkeeping keys that are null are left out."""
        return {k: v for k, v in super().to_dict().items() if not (v is None and k in _OMIT_WHEN_NULL)}

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> GptqConfig:
        return cls(bits=bits, **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GptqConfig:
        """Also reads the keys other tools add: GPTQModel's ``quant_method`` spelling and AutoGPTQ's
        ``model_name_or_path`` / ``model_file_base_name`` (file names, meaningless here)."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in ("model_name_or_path", "model_file_base_name")}
            if isinstance(data.get("quant_method"), str):
                data["quant_method"] = data["quant_method"].lower()
            if isinstance(data.get("format"), str):
                data["format"] = data["format"].lower()
            if isinstance(data.get("checkpoint_format"), str):
                data["checkpoint_format"] = data["checkpoint_format"].lower()
        return super().from_dict(data)
