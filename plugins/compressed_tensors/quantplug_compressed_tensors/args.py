"""The keys of one compressed-tensors ``QuantizationArgs`` mapping (``weights`` /
``input_activations`` in a ``config_groups`` entry) that record how the scales and zero points are
stored (``scale_dtype``, ``zp_dtype``) and how llm-compressor computed them (``observer``,
``observer_kwargs``). Light: imports neither torch nor compressed-tensors."""

from __future__ import annotations

from typing import Any

#: float dtypes a stored scale may have: compressed-tensors keeps scales in the dtype it observed them
#: in, one of these (``initialize_qparams``), and casts them to the model's dtype when it reads them
FLOAT_SCALE_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: the zero-point dtype compressed-tensors (>= 0.12) records for each weight type (``zp_dtype``, written
#: for asymmetric schemes): what ``QuantizationArgs`` infers when none is given
DEFAULT_ZP_DTYPES = {"int": "int8", "float": "float8_e4m3fn"}


def _dtype_name(value: Any) -> str | None:
    """``"torch.int8"`` / ``"int8"`` (as compressed-tensors writes a ``TorchDtype``) -> ``"int8"``."""
    return value.removeprefix("torch.") if isinstance(value, str) else None


def stored_dtype_problems(where: str, args: dict[str, Any]) -> list[str]:
    """What is wrong with the ``scale_dtype`` / ``zp_dtype`` / ``observer`` keys of one
    ``QuantizationArgs`` mapping (``weights`` or ``input_activations``): these record how
    compressed-tensors stores the scales and zero points, and how llm-compressor computed them."""
    problems = []
    scale, zp = args.get("scale_dtype"), args.get("zp_dtype")
    if scale is not None and _dtype_name(scale) not in FLOAT_SCALE_DTYPES:
        problems.append(
            f"{where}.scale_dtype={scale!r}: this plugin dequantizes with float scales "
            f"({', '.join(FLOAT_SCALE_DTYPES)}); scales stored as {scale} (the encoded scales of NVFP4 / MX "
            f"formats) are not supported"
        )
    expected = DEFAULT_ZP_DTYPES.get(args.get("type", "int"))
    if zp is not None and _dtype_name(zp) != expected:
        problems.append(
            f"{where}.zp_dtype={zp!r}: this plugin reads {args.get('type', 'int')} zero points of dtype "
            f"torch.{expected} (what compressed-tensors records for them); zero points stored as {zp} are not "
            f"supported"
        )
    observer, kwargs = args.get("observer"), args.get("observer_kwargs", {})
    if observer is not None and not isinstance(observer, str):
        problems.append(f"{where}.observer={observer!r}: an observer name (a string) or null")
    if kwargs is not None and not isinstance(kwargs, dict):
        problems.append(f"{where}.observer_kwargs={kwargs!r}: a mapping or null")
    return problems
