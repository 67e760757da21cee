"""``quantplug kernels``: the kernels that run integer-grid layers (``quantplug.kernels``), whether
each runs on this machine, and, with ``--presets``, which one runs each installed preset's layers
here (measured: the preset's check layer is quantized in ``--dtype`` and the kernel choice read
back). The command group is in ``quantplug.cli``."""

from __future__ import annotations

import json

import click

from .cli_compare import candidates_option
from .stdout_guard import GuardedCommand, echo


@click.command("kernels", cls=GuardedCommand)
@click.option(
    "--presets", is_flag=True, help="Quantize each installed preset's check layer and say what runs it."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps, ...")
@click.option(
    "--dtype", default="bfloat16", show_default=True, help="The model dtype the presets are run in."
)
@candidates_option("With --presets: only these (repeatable; a backend alone: all its presets).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def kernels_cmd(presets, device, dtype, candidates, as_json) -> None:
    """List the kernels and, with --presets, which one runs each preset here."""
    from .kernels import _machine_problem, available_kernels, kernel_names, kernel_problems

    names = kernel_names()
    table = available_kernels()
    rows = []
    for name, kernel in sorted(table.items()):
        problem = _machine_problem(name)
        rows.append(
            {
                "kernel": name,
                "from": names.get(name, "registered in this process"),
                "device": kernel.device_type,
                "dtypes": list(kernel.dtypes),
                "dense_from": kernel.dense_from,
                "status": "ready" if problem is None else f"not here: {problem}",
                "description": kernel.description,
            }
        )
    broken = kernel_problems()
    measured = _preset_kernels(device, dtype, candidates) if presets else None
    if as_json:
        echo(json.dumps({"kernels": rows, "broken": broken, "presets": measured}, indent=2))
        return
    for r in rows:
        echo(f"{r['kernel']:<18} {r['device']:<5} {'/'.join(r['dtypes']):<17} {r['status']}  ({r['from']})")
        echo(f"{'':<18} {r['description']}; dequantized dense matmul from {r['dense_from']} rows")
    for name, why in broken.items():
        echo(f"{name:<18} broken: {why}")
    if measured is not None:
        echo(f"\npresets in {dtype} on {device}:")
        width = max((len(k) for k in measured), default=10)
        for label, what in measured.items():
            echo(f"  {label:<{width}}  {what}")


def _preset_kernels(device: str, dtype: str, candidates: tuple[str, ...]) -> dict[str, str]:
    """``backend:preset`` -> the kernel that ran its check layer, or why none did."""
    import warnings

    from . import dispatch
    from .preset_check import measure_preset

    wanted = {c.partition(":")[0]: c.partition(":")[2] for c in candidates}
    out = {}
    for backend in dispatch.backends():
        if wanted and backend.name not in wanted:
            continue
        for preset in backend.presets:
            if wanted.get(backend.name) and wanted[backend.name] != preset.name:
                continue
            label = f"{backend.name}:{preset.name}"
            if not backend.available:
                out[label] = f"- (backend unavailable: {backend.status.reason})"
                continue
            click.echo(f"  measuring {label} ...", err=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[label] = measure_preset(backend, preset, device, dtype).kernel or "-"
            except Exception as exc:  # one preset that cannot run here must not hide the others
                out[label] = f"- (could not quantize here: {str(exc).splitlines()[0][:200]})"
    return out
