"""``quantplug compare``: quantize a model with each candidate and measure it (and the options it
shares with ``select``). The command group is in ``quantplug.cli``."""

from __future__ import annotations

import json

import click

from .stdout_guard import GuardedCommand, echo

workload_option = click.option(
    "--workload",
    type=click.Choice(["decode", "prefill", "mixed"]),
    default="decode",
    show_default=True,
    help="decode: token by token; prefill: long prompts; mixed: both.",
)
priority_option = click.option(
    "--priority",
    type=click.Choice(["balanced", "quality", "size", "speed"]),
    default="balanced",
    show_default=True,
)


def candidates_option(help: str):
    """``-c / --candidate BACKEND[:PRESET]`` (repeatable) into ``candidates``: compare, bench-presets, kernels."""
    return click.option(
        "-c", "--candidate", "candidates", multiple=True, metavar="BACKEND[:PRESET]", help=help
    )


@click.command("compare", cls=GuardedCommand)
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@candidates_option("A candidate (repeatable), e.g. bitsandbytes:nf4; default: every one `select` ranks.")
@click.option("--top", type=click.IntRange(min=1), help="Measure only select's first N candidates.")
@click.option(
    "--per-backend",
    type=click.IntRange(min=1),
    help="Measure at most each backend's N best-ranked candidates.",
)
@click.option("--device", help="cpu, cuda, ... (default: cuda when available, else cpu).")
@click.option(
    "--text", "text_file", type=click.Path(exists=True, dir_okay=False), help="Text for perplexity."
)
@click.option(
    "--tokens", type=click.IntRange(min=2), default=2048, show_default=True, help="Perplexity tokens."
)
@click.option(
    "--prefill-tokens", type=click.IntRange(min=1), help="Prompt length (default 256 CPU, 2048 GPU)."
)
@click.option("--decode-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="Measure every model through torch.compile (minutes per model).",
)
@click.option(
    "--calibration-tokens",
    type=click.IntRange(min=0),
    default=2048,
    show_default=True,
    help="Tokens of the text after the evaluated ones, for candidates that need calibration (GPTQ).",
)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Run the unquantized model and every candidate in this dtype (default: the model's own dtype, "
    "next to it bfloat16 where the device supports it, and each candidate in the dtype its preset is built for).",
)
@click.option(
    "--task",
    type=click.Choice(["causal-lm", "feature-extraction", "sequence-classification", "outputs"]),
    help="What quality means (default: from the model's class): perplexity, pooled sentence embeddings "
    "(cosine and recall@10), label agreement, or the output's relative error.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="torch threads for the run (default on CPU: the cores other processes leave free).",
)
@workload_option
@priority_option
@click.option(
    "--max-quality-loss",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Largest acceptable quality loss: relative perplexity increase, 1 - embedding cosine (encoders), "
    "1 - label agreement (classifiers), or the output error.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (progress stays on stderr).")
@click.option(
    "--out-dir", type=click.Path(file_okay=False), help="Write comparison.json and comparison.md here."
)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a size vs quality plot (PNG).")
def compare_cmd(
    model,
    candidates,
    top,
    per_backend,
    device,
    text_file,
    tokens,
    prefill_tokens,
    decode_tokens,
    compile_,
    calibration_tokens,
    repeats,
    dtype,
    task,
    threads,
    workload,
    priority,
    max_quality_loss,
    as_json,
    out_dir,
    plot,
):
    """Quantize MODEL (a full-precision checkpoint folder) with each candidate and measure weight
    bytes, quality, quantize time and decode / prefill latency on this machine."""
    from pathlib import Path

    from .errors import QuantplugError

    _check_outputs(out_dir, plot)  # before minutes of measuring, not after
    try:
        from .comparison import compare

        text = Path(text_file).read_text(encoding="utf-8", errors="replace") if text_file else None
        result = compare(
            model,
            list(candidates) or None,
            text=text,
            device=device,
            tokens=tokens,
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            compile=compile_,
            calibration_tokens=calibration_tokens,
            repeats=repeats,
            top=top,
            per_backend=per_backend,
            workload=workload,
            priority=priority,
            max_quality_loss=max_quality_loss,
            dtype=dtype,
            task=task,
            threads=threads,
        )
    except QuantplugError as exc:
        raise click.ClickException(str(exc)) from None
    # what was measured is out before the plot, which can still fail
    if out_dir:
        result.write(out_dir)
    echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
    if plot:
        try:
            result.plot(plot)
        except QuantplugError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"plot: {plot}", err=True)


def _check_outputs(out_dir, plot) -> None:
    """Refuse, before measuring, outputs that cannot be written (no matplotlib, no folder)."""
    import importlib.util
    from pathlib import Path

    if plot and importlib.util.find_spec("matplotlib") is None:
        raise click.UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'quantplug[plot]' (or drop --plot); "
            "nothing was measured"
        )
    folders = [Path(out_dir)] if out_dir else []
    if plot:
        folders.append(Path(plot).parent)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.UsageError(
                f"cannot create {folder} for the results: {exc}; nothing was measured"
            ) from None
