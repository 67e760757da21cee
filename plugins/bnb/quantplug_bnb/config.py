"""``BnbConfig``: bitsandbytes settings, with the keys of Transformers' ``BitsAndBytesConfig``.

Light: imports neither torch nor bitsandbytes. ``config.json`` files interoperate both ways:
Transformers' ``quantization_config`` for ``quant_method: bitsandbytes`` (including the private
``_load_in_4bit`` / ``_load_in_8bit`` copies it writes) loads into ``BnbConfig``, and the dict
``BnbConfig`` writes is accepted by Transformers' ``BitsAndBytesConfig`` (which ignores the one key
it does not know, ``modules_to_not_convert``).

``llm_int8_skip_modules`` (Transformers' name) and ``modules_to_not_convert`` (quantplug's name)
are one setting: give either, and both hold it; giving both with different values is an error.
``None`` means the default of both libraries: keep the output head (and tied layers) in full
precision. quantplug's core matches the patterns both its own way and Transformers' way
(``skip_rules``), so everything Transformers leaves unconverted stays unconverted here too.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Literal

import quantplug


@dataclasses.dataclass(frozen=True)
class BnbConfig(quantplug.QuantConfig):
    """bitsandbytes quantization; the fields are Transformers' ``BitsAndBytesConfig``'s.

    load_in_8bit                      LLM.int8(): int8 weights, one scale per output row (Linear8bitLt)
    load_in_4bit                      4-bit weights in blocks of 64 (Linear4bit); exactly one of the two
    llm_int8_threshold                8-bit: activation outlier threshold (columns above it run in 16 bit)
    llm_int8_skip_modules             modules left in full precision (None: the output head); the same
                                      setting as modules_to_not_convert
    llm_int8_enable_fp32_cpu_offload  Transformers' device_map offloading switch; quantplug keeps a
                                      model on one device, so it changes nothing here (kept for interop)
    llm_int8_has_fp16_weight          must be false: quantplug stores int8 weights
    bnb_4bit_compute_dtype            4-bit: dtype the matmul runs in (null: float32, as in Transformers)
    bnb_4bit_quant_type               4-bit: "nf4" (normal float) or "fp4" (Transformers' default)
    bnb_4bit_use_double_quant         4-bit: quantize the per-block scales again (8-bit), ~0.4 bit/weight less
    bnb_4bit_quant_storage            4-bit: dtype the packed 4-bit codes are stored in (null: uint8)
    """

    quant_method = "bitsandbytes"
    skip_aliases: ClassVar[tuple[str, ...]] = ("llm_int8_skip_modules",)
    skip_rules: ClassVar[tuple[str, ...]] = ("components", "transformers")

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: tuple[str, ...] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: Literal["float32", "float16", "bfloat16"] | None = "float32"
    bnb_4bit_quant_type: Literal["fp4", "nf4"] = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: Literal["uint8", "int8", "float16", "bfloat16", "float32", "float64"] | None = (
        "uint8"
    )

    @property
    def bits(self) -> int:
        """4 or 8: the weight bit width this config stores."""
        return 8 if self.load_in_8bit else 4

    def validate(self) -> None:
        # null means Transformers' defaults; store them, so equal settings compare equal
        if self.bnb_4bit_compute_dtype is None:
            object.__setattr__(self, "bnb_4bit_compute_dtype", "float32")
        if self.bnb_4bit_quant_storage is None:
            object.__setattr__(self, "bnb_4bit_quant_storage", "uint8")
        if self.load_in_4bit == self.load_in_8bit:
            raise self.invalid(
                "load_in_4bit",
                "exactly one of load_in_4bit / load_in_8bit set to true",
                "load_in_8bit is also true; pick one"
                if self.load_in_8bit
                else "neither load_in_4bit nor load_in_8bit is true, so nothing would be quantized; "
                "or use BnbConfig.for_bits(4 or 8)",
            )
        if self.llm_int8_threshold < 0:
            raise self.invalid("llm_int8_threshold", "a number >= 0 (0 disables outlier decomposition)")
        if self.llm_int8_has_fp16_weight:
            raise self.invalid(
                "llm_int8_has_fp16_weight",
                "false",
                "it keeps 16-bit weights and quantizes them on every forward; quantplug-bnb stores int8 weights",
            )
        skip, mtnc = self.llm_int8_skip_modules, self.modules_to_not_convert
        if skip is not None and mtnc is not None and skip != mtnc:
            raise self.invalid(
                "modules_to_not_convert",
                f"the same list as llm_int8_skip_modules ({list(skip)!r}), or null",
                "it is another name for llm_int8_skip_modules",
            )
        field = "llm_int8_skip_modules" if skip is not None else "modules_to_not_convert"
        for pattern in getattr(self, field) or ():
            try:
                re.compile(pattern)  # Transformers' rule (one of skip_rules) matches them as regexes
            except re.error as exc:
                raise self.invalid(
                    field,
                    "module names or regular expressions (Transformers matches them as regexes)",
                    f"{pattern!r} is not a valid regular expression: {exc}",
                ) from None
        object.__setattr__(self, "llm_int8_skip_modules", skip if skip is not None else mtnc)
        object.__setattr__(self, "modules_to_not_convert", mtnc if mtnc is not None else skip)

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> BnbConfig:
        """4 -> NF4 4-bit (``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``); 8 -> LLM.int8()."""
        if bits == 4:
            return cls(**{"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", **overrides})
        if bits == 8:
            return cls(**{"load_in_8bit": True, **overrides})
        raise quantplug.ConfigError(
            f"{cls.__name__}: bitsandbytes stores weights at 4 or 8 bits, not {bits!r}",
            field="bits",
            value=bits,
            allowed=[4, 8],
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BnbConfig:
        """Also reads Transformers' ``BitsAndBytesConfig.to_dict()``, which repeats ``load_in_4bit`` /
        ``load_in_8bit`` as ``_load_in_4bit`` / ``_load_in_8bit``: those must agree with the public keys."""
        if isinstance(data, dict):  # anything else: the base class says what is wrong
            data = dict(data)
            for public in ("load_in_4bit", "load_in_8bit"):
                private = "_" + public
                if private in data and data.setdefault(public, data[private]) != data[private]:
                    raise quantplug.ConfigError(
                        f"{cls.__name__}: {public}={data[public]!r} contradicts {private}={data[private]!r}; "
                        f"make them equal (or drop {private})",
                        field=public,
                        value=data[public],
                        allowed=[data[private]],
                    )
                data.pop(private, None)
        return super().from_dict(data)
