"""``AutoRoundConfig``: AutoRound settings, with the keys of Transformers' ``AutoRoundConfig`` and
every key auto-round itself writes into ``config.json`` (so users' dicts and hub checkpoints
parse), plus the tuning settings. Light: no torch, no auto_round.

Rules that need a layer's shape (``group_size`` must divide ``in_features``, ...) are applied by the
quantizer when a model is planned: such a layer stays in full precision and the report says why.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import quantplug

#: packing formats this plugin reads and writes: auto-round's format="auto_round" writes the first for
#: symmetric weights, the second for 4-bit asymmetric ones, the third for other asymmetric ones; the
#: fourth is Transformers' AutoRoundConfig default, which auto-round reads as the first
PACKING_FORMATS = ("auto_round:auto_gptq", "auto_round:auto_awq", "auto_round", "auto_round:gptq")


@dataclasses.dataclass(frozen=True)
class AutoRoundConfig(quantplug.QuantConfig):
    """AutoRound weight-only integer quantization (needs calibration data).

    bits            2, 3, 4, 5, 6, 7 or 8 bits per weight (the CPU kernel runs 2, 4, 8; others
                    run on auto-round's torch backend)
    group_size      weights sharing one scale / zero point along the input dimension; -1 = a row
    sym             symmetric (no zero point stored beyond the fixed midpoint) or asymmetric
    backend         auto-round's inference backend: "auto" (what Transformers picks) or a name
                    auto-round knows ("auto_round_kernel", "torch", "gptqmodel", ...)
    packing_format  "auto_round:auto_gptq" (auto-round's choice when sym), "auto_round:auto_awq"
                    (its choice for 4-bit asym), "auto_round" (other asym); null = auto-round's choice
    iters           sign-gradient steps per block (auto-round's default 200; 0 = its RTN mode)
    nsamples        calibration samples used (null = every given sample)
    seqlen          tokens per sample (null = the shortest given sample; longer ones are cut)
    lr, minmax_lr   learning rates (null = auto-round's 1 / iters)
    batch_size, gradient_accumulate_steps, enable_minmax_tuning, enable_quanted_input,
    enable_norm_bias_tuning, amp, low_gpu_mem_usage, seed: passed to AutoRound as they are

    The remaining fields are what auto-round records in config.json (``autoround_version``,
    ``data_type``, ``block_name_to_quantize``, ``extra_config``, ``act_*`` ...): read, kept and
    checked, never needed to quantize.
    """

    quant_method = "auto-round"

    # Transformers' AutoRoundConfig
    bits: Literal[2, 3, 4, 5, 6, 7, 8] = 4
    group_size: int = 128
    sym: bool = True
    backend: str = "auto"
    packing_format: str | None = None
    # tuning (passed to AutoRound)
    iters: int = 50
    nsamples: int | None = None
    seqlen: int | None = None
    batch_size: int = 8
    lr: float | None = None
    minmax_lr: float | None = None
    enable_minmax_tuning: bool = True
    enable_quanted_input: bool = True
    enable_norm_bias_tuning: bool = False
    gradient_accumulate_steps: int = 1
    amp: bool = True
    low_gpu_mem_usage: bool = False
    seed: int = 42
    # what auto-round writes into config.json besides the above
    autoround_version: str | None = None
    data_type: str = "int"
    act_bits: int = 16
    act_group_size: int | None = None
    act_sym: bool | None = None
    act_data_type: str | None = None
    act_dynamic: bool | None = None
    super_bits: int | None = None
    super_group_size: int | None = None
    scale_dtype: str | None = None
    dataset: str | None = None
    block_name_to_quantize: str | tuple[str, ...] | None = None
    to_quant_block_names: str | tuple[str, ...] | None = None
    quant_block_list: tuple[Any, ...] | None = None
    extra_config: dict[str, Any] | None = None
    regex_config: dict[str, Any] | None = None
    static_kv_dtype: str | None = None
    static_attention_dtype: str | None = None
    static_kv_granularity: str | None = None
    static_attention_granularity: str | None = None
    rotation_configs: tuple[Any, ...] | None = None

    def validate(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise self.invalid("group_size", "-1 (one group per output row) or a positive integer")
        if self.packing_format is None:  # auto-round's choice (export/formats/backends/autoround.py)
            default = (
                PACKING_FORMATS[0]
                if self.sym
                else PACKING_FORMATS[1]
                if self.bits == 4
                else PACKING_FORMATS[2]
            )
            object.__setattr__(self, "packing_format", default)
        if self.packing_format not in PACKING_FORMATS:
            raise self.invalid(
                "packing_format",
                " or ".join(map(repr, PACKING_FORMATS)),
                "other auto-round packings (gptq, awq, llm_compressor, gguf) are other checkpoint formats",
            )
        if self.packing_format == "auto_round:auto_awq" and (self.sym or self.bits not in (2, 3, 4, 8)):
            raise self.invalid(
                "packing_format", "'auto_round:auto_awq' only with sym=false and 2, 3, 4 or 8 bits"
            )
        if self.bits == 8 and not self.sym:
            raise self.invalid(
                "sym",
                "true at 8 bits",
                "auto-round refuses 8-bit asymmetric weights in its own format: vLLM serves W8 GPTQ-format weights "
                "symmetric only",
            )
        if self.data_type != "int":
            raise self.invalid(
                "data_type",
                "'int'",
                "auto-round's float formats (mx_fp, nv_fp, fp8) are not supported by this plugin",
            )
        if self.act_bits < 16:
            raise self.invalid("act_bits", "16 or more (weight-only quantization)")
        for name in ("super_bits", "super_group_size"):
            if getattr(self, name) is not None:
                raise self.invalid(name, "null", "GGUF double quantization is not supported by this plugin")
        if self.rotation_configs:
            raise self.invalid(
                "rotation_configs", "null or []", "rotated checkpoints are not supported by this plugin"
            )
        if self.iters < 0:
            raise self.invalid("iters", "0 (auto-round's RTN mode) or a positive integer")
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise self.invalid(name, "null (derived from the calibration data) or a positive integer")
        for name in ("batch_size", "gradient_accumulate_steps"):
            if getattr(self, name) < 1:
                raise self.invalid(name, "a positive integer")
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise self.invalid(name, "null (auto-round's 1 / iters) or a positive number")
        self._validate_extra_config()

        blocks = self.block_names()
        if self.modules_to_not_convert is None and blocks is not None and self.extra_config:
            # auto-round quantized layers outside its blocks (e.g. lm_head, listed in extra_config):
            # which layers are quantized is then what the checkpoint says, not quantplug's default
            # of keeping the output head (skip_reason applies the checkpoint's rule)
            outside = [
                k
                for k, e in self.extra_config.items()
                if (e.get("bits") or self.bits) <= 8
                and not any(k == b or k.startswith(b + ".") for b in blocks)
            ]
            if outside:
                object.__setattr__(self, "modules_to_not_convert", ())

    def _validate_extra_config(self) -> None:
        """Each ``extra_config`` entry is a dict of integer settings, or keeps a layer unquantized."""
        if self.extra_config is None:
            return
        for key, entry in self.extra_config.items():
            # a layer kept unquantized (bits >= 16) may say data_type "float": auto-round writes that
            # for the MoE routers it leaves out ({".*model\\.layers\\.0\\.mlp\\.gate.*": {"bits": 16, ...}})
            kept = (
                isinstance(entry, dict)
                and isinstance(entry.get("bits"), (int, float))
                and entry["bits"] >= 16
            )
            if not isinstance(entry, dict) or (entry.get("data_type", "int") != "int" and not kept):
                raise self.invalid(
                    "extra_config",
                    "{layer name or regex: {bits, group_size, sym, ...}}",
                    f"entry {key!r}",
                )

    def to_dict(self) -> dict[str, Any]:
        """As the base class, without the fields left null: auto-round's loader (which Transformers
        calls) reads a present key as set, e.g. ``extra_config: null`` as a mapping. ``from_dict``
        gives the missing ones their null default, so the round trip holds."""
        return {k: v for k, v in super().to_dict().items() if v is not None}

    def __hash__(self) -> int:  # extra_config is a dict; the kept keys (``extra``) are not part of ==
        fields = {k: v for k, v in self.to_dict().items() if k not in self.extra}
        return hash(json.dumps(fields, sort_keys=True, default=str))

    @property
    def packing(self) -> str:
        """The packing as auto-round's exporter and inference backends name it."""
        return "auto_round:auto_gptq" if self.packing_format == "auto_round:gptq" else self.packing_format

    def layer_entry(self, name: str) -> dict[str, Any] | None:
        """The ``extra_config`` entry for the layer ``name`` (its exact name, else the first regex that
        matches it, as auto-round reads it), or None when it does not list the layer."""
        if not self.extra_config:
            return None
        import re

        if name in self.extra_config:
            return self.extra_config[name]
        for pattern, entry in self.extra_config.items():
            try:
                if re.search(pattern, name):
                    return entry
            except re.error:
                continue
        return None

    def layer_bits(self, name: str) -> int | None:
        """The bits ``extra_config`` gives the layer ``name``, or None when it does not list it."""
        entry = self.layer_entry(name)
        if entry is None:
            return None
        bits = entry.get("bits", self.bits)
        return int(bits) if isinstance(bits, (int, float)) else self.bits

    def layer_scheme(self, name: str) -> dict[str, Any]:
        """bits / group_size / sym of the layer ``name``: the config's, overridden by its
        ``extra_config`` entry."""
        entry = self.layer_entry(name) or {}
        scheme = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        scheme.update({k: entry[k] for k in scheme if entry.get(k) is not None})
        return scheme

    def block_names(self) -> list[str] | None:
        """The block prefixes the checkpoint says were quantized (``block_name_to_quantize``, else
        ``to_quant_block_names``), or None when it does not say."""
        value = (
            self.block_name_to_quantize
            if self.block_name_to_quantize is not None
            else self.to_quant_block_names
        )
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(i).strip() for i in items if str(i).strip()]

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> AutoRoundConfig:
        """``bits`` with groups of 128 (auto-round's default), symmetric."""
        return cls(**{"bits": bits, "group_size": 128, **overrides})
