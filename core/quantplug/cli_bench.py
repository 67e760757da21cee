"""``quantplug bench-presets``: measure every installed preset's speed on this machine and store the
figures ``select`` then ranks by (``local_speed``). The command group is in ``quantplug.cli``."""

from __future__ import annotations

import json

import click

from .cli_compare import candidates_option
from .stdout_guard import GuardedCommand, echo


@click.command("bench-presets", cls=GuardedCommand)
@click.argument("model", required=False, type=click.Path(exists=True))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps, ...")
@candidates_option(
    "Measure only these (repeatable; a backend alone: all its presets). Default: every installed one."
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="OUTxIN",
    help="A Linear weight shape to measure (repeatable), e.g. 1536x576; default: MODEL's, else "
    "SmolLM2-135M's (576x576, 1536x576, 576x1536).",
)
@click.option(
    "--budget",
    "budget_s",
    type=click.FloatRange(min=0),
    default=180.0,
    show_default=True,
    help="Seconds to aim for in total (each preset gets at least 3 timing rounds).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (progress stays on stderr).")
def bench_presets_cmd(model, device, candidates, shapes, budget_s, as_json) -> None:
    """Measure decode (1 row) and prefill (256 rows on CPU, 2048 on GPU) speed of each installed
    preset eligible on DEVICE against the unquantized model (float32 and bfloat16), on synthetic
    layers of MODEL's Linear shapes (a model folder; default: SmolLM2-135M's), and store the figures
    for this machine, where `quantplug select` ranks by them (`--declared-speed` there ignores them)."""
    from .errors import QuantplugError
    from .local_speed import bench_presets

    if model and shapes:
        raise click.UsageError("give MODEL or --shape, not both")
    try:
        result = bench_presets(
            list(shapes) if shapes else model,
            device=device,
            presets=list(candidates) or None,
            budget_s=budget_s,
            log=lambda line: click.echo(line, err=True),
        )
    except QuantplugError as exc:
        raise click.ClickException(str(exc)) from None
    echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
    click.echo(f"figures written to {result.path}", err=True)
