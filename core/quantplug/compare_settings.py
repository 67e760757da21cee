"""``compare``'s arguments and how the run is set up: the dtypes the models run in (the
unquantized model in its own dtype and in bfloat16 where the device computes in it natively) and
torch's thread count, each with the sentence the report states it in."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .measure import Bench, vocab_size
from .text_quality import default_text


def check_arguments(
    top: Any,
    per_backend: Any,
    tokens: Any,
    window: Any,
    decode_tokens: Any,
    repeats: Any,
    max_quality_loss: Any,
) -> None:
    for name, value in (("top", top), ("per_backend", per_backend)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(
                f"{name} must be a positive integer or None, got {value!r}", field=name, value=value
            )
    for name, value, low in (
        ("tokens", tokens, 2),
        ("window", window, 2),
        ("decode_tokens", decode_tokens, 1),
        ("repeats", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}", field=name, value=value)
    if not (isinstance(max_quality_loss, (int, float)) and max_quality_loss >= 0):
        raise ConfigError(
            f"max_quality_loss must be a number >= 0, got {max_quality_loss!r}", field="max_quality_loss"
        )


def check_run_arguments(calibration_tokens: Any, dtype: Any, threads: Any, task: Any) -> torch.dtype | None:
    """Check the run's other arguments before any work; returns the dtype forced (None: none)."""
    from .encoder_quality import check_task

    check_calibration_tokens(calibration_tokens)
    check_threads(threads)
    check_task(task)
    return dtype_arg(dtype)


def check_calibration_tokens(calibration_tokens: Any) -> None:
    if (
        not isinstance(calibration_tokens, int)
        or isinstance(calibration_tokens, bool)
        or calibration_tokens < 0
    ):
        raise ConfigError(
            f"calibration_tokens must be an integer >= 0, got {calibration_tokens!r}",
            field="calibration_tokens",
            value=calibration_tokens,
            allowed="an integer >= 0 (0: no calibrating candidates)",
        )


def dtype_arg(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(
            f"dtype {dtype!r} is not a torch floating-point dtype",
            field="dtype",
            value=dtype,
            allowed=["float32", "bfloat16", "float16", "a torch.dtype", "None"],
        )
    return value


def check_threads(threads: Any) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(
            f"threads must be a positive integer or None, got {threads!r}", field="threads", value=threads
        )


def other_dtypes_for(
    model: nn.Module, dev: torch.device, forced: torch.dtype | None
) -> tuple[torch.dtype, ...]:
    """bfloat16 next to the model's own dtype, where the device computes in it natively."""
    own = next(model.parameters()).dtype
    if forced is not None or own == torch.bfloat16 or not bf16_native(dev):
        return ()
    return (torch.bfloat16,)


def bf16_native(dev: torch.device) -> bool:
    """Whether ``dev`` computes in bfloat16 natively (CPU: AVX-512 BF16 / AMX, as oneDNN reports)."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check and check())
    return False


def dtype_note(forced: torch.dtype | None, others: tuple[torch.dtype, ...], dev: torch.device) -> str:
    if forced is not None:
        return f"every model in {str(forced).replace('torch.', '')} (dtype given)"
    note = "the unquantized model in its own dtype"
    if others:
        note += " and in " + ", ".join(str(d).replace("torch.", "") for d in others)
    elif not bf16_native(dev):
        note += f" (not in bfloat16: {dev.type} here has no native bfloat16)"
    return note + "; each candidate in the dtype its preset is built for (the table's dtype column)"


def threads_note(n: int, given: int | None, busy: float | None) -> str:
    if given is not None:
        return f"{n} (given)"
    if busy is None:
        return f"{n} (torch's default)"
    return f"{n} of {os.cpu_count()} cores (other processes kept {busy:.1f} core(s) busy before the run)"


def run_settings(
    model_name: str,
    dev: torch.device,
    bench: Bench,
    text: str | None,
    encoding: str,
    workload: str,
    priority: str,
    max_quality_loss: float,
) -> dict[str, Any]:
    """How the comparison was run, as its report and JSON state it."""
    return {
        "model": model_name,
        "device": str(dev),
        "tokens": int(bench.eval_ids.numel()),
        "window": bench.window,
        "text": "custom" if text is not None else "pydoc_data.topics (Python stdlib)",
        "encoding": encoding,
        "prefill_tokens": int(bench.prefill_in.shape[-1])
        if isinstance(bench.prefill_in, torch.Tensor)
        else None,
        "decode_tokens": bench.decode_tokens,
        "repeats": bench.repeats,
        "workload": workload,
        "priority": priority,
        "max_quality_loss": max_quality_loss,
        "quality": _quality(bench),
        "calibration": bench.calibration_note,
    }


def _quality(bench: Bench) -> str:
    if bench.causal:
        return "perplexity"
    if bench.sentences is not None:
        return bench.sentences.describe(bench.task) + ", against the unquantized model's"
    return "output relative error vs unquantized"


def with_sentences(
    bench: Bench,
    model: nn.Module,
    task: str | None,
    text: str | None,
    tokenizer: Any,
    inputs: Any,
    pooling: str,
) -> None:
    """Set ``bench.task`` (given, or from the model's class) and, for encoders and classifiers
    measured on text, the sentences their quality is scored on."""
    from .encoder_quality import detect_task, sentence_bench

    bench.task = task or detect_task(model, bench.causal)
    if (bench.task == "causal-lm") != bench.causal:
        raise ConfigError(
            f"task {bench.task!r} does not fit {type(model).__name__}: causal-lm is for causal language models "
            f"measured on text (not inputs=), and only for them",
            field="task",
            value=bench.task,
        )
    if bench.task in ("feature-extraction", "sequence-classification"):
        if inputs is not None:
            raise ConfigError(
                f"task {bench.task!r} scores sentences of the text: leave inputs= out, or use task='outputs'",
                field="task",
            )
        source = text if text is not None else default_text()
        bench.sentences = sentence_bench(source, tokenizer, vocab_size(model), bench.device, pooling)
