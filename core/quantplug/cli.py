"""The ``quantplug`` command line: ``list``, ``doctor`` (and, as they land, ``quantize``, ``select``, ``compare``).

``list`` and ``doctor`` read plugin metadata only: they import neither torch nor any backend library.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from . import registry as reg


def _library_text(backend) -> str:
    versions = backend.status.library_versions
    if not backend.requires:
        return "-"
    return ", ".join(f"{name} {ver or '(missing)'}" for name, ver in versions.items()) or "-"


def _caps_text(caps) -> str:
    flags = [
        f"bits={','.join(map(str, caps.bits))}",
        f"devices={','.join(caps.devices)}",
    ]
    if caps.needs_calibration:
        flags.append("calibration")
    if caps.trainable:
        flags.append("trainable")
    if caps.serializable:
        flags.append("serializable")
    return " ".join(flags)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="quantplug")
def main() -> None:
    """Quantize PyTorch / Transformers models with any installed backend."""


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(as_json: bool) -> None:
    """List installed backends, their plugin and library versions, status and capabilities."""
    backends = reg.backends()
    problems = reg.registry().problems
    if as_json:
        out = {
            "quantplug": __version__,
            "backends": [
                {
                    "name": b.name,
                    "plugin": b.plugin,
                    "plugin_version": b.plugin_version,
                    "requires": list(b.requires),
                    "libraries": dict(b.status.library_versions),
                    "available": b.available,
                    "reason": b.status.reason or None,
                    "fix": b.status.fix or None,
                    "notes": b.notes or None,
                    "capabilities": b.capabilities.to_dict(),
                }
                for b in backends
            ],
            "plugin_problems": [p.__dict__ for p in problems],
        }
        click.echo(json.dumps(out, indent=2))
        return
    if not backends:
        click.echo("No backends installed. Install one, e.g.: pip install quantplug-rtn")
    rows = [("backend", "plugin", "library", "status", "capabilities")]
    for b in backends:
        status = "available" if b.available else "unavailable: " + b.status.reason
        rows.append(
            (
                b.name,
                f"{b.plugin} {b.plugin_version}".strip(),
                _library_text(b),
                status,
                _caps_text(b.capabilities),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    for b in backends:
        if b.notes:
            click.echo(f"note: {b.name}: {b.notes}")
    if problems:
        click.echo(
            f"\n{len(problems)} plugin problem(s); run `quantplug doctor` for details and fixes.", err=True
        )


@main.command()
def doctor() -> None:
    """Report every plugin and backend problem with its fix. Exits 1 when there are problems."""
    click.echo(f"quantplug {__version__}, Python {sys.version.split()[0]}")
    for p in reg.plugins():
        where = f"{p.dist} {p.version}" if p.dist else p.module
        detail = f" -> backends: {', '.join(p.backends)}" if p.backends else ""
        if p.status != "loaded":
            detail = f" ({p.error})"
        click.echo(f"  plugin {p.name} [{where}]: {p.status}{detail}")
    notes = [b for b in reg.backends() if b.notes]
    for b in notes:
        click.echo(f"  note: {b.name}: {b.notes}")
    problems = reg.problems()
    if not problems:
        click.echo("No problems found.")
        return
    click.echo(f"\n{len(problems)} problem(s):")
    for p in problems:
        click.echo(f"- {p}")
    sys.exit(1)


def _parse_sets(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--set")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string, e.g. --set bnb_4bit_quant_type=nf4
    return out


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-m", "--method", required=True, help="Backend (quant_method), e.g. rtn; see `quantplug list`.")
@click.option("-b", "--bits", type=int, help="Weight bits; the backend picks its config for that width.")
@click.option(
    "-s", "--set", "sets", multiple=True, metavar="KEY=VALUE", help="A config key (JSON value); repeatable."
)
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Output checkpoint folder."
)
@click.option("--device", default="cpu", show_default=True, help="Device to quantize on.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def quantize(model_dir, method, bits, sets, output, device, max_shard_size, progress) -> None:
    """Quantize a full-precision checkpoint folder while reading it, and save the result.

    Tokenizer and other non-weight files of MODEL_DIR are copied to the output."""
    import time
    from pathlib import Path

    from .checkpoint import load, non_checkpoint_files, save
    from .errors import QuantplugError

    t0 = time.perf_counter()
    try:
        backend = reg.get_backend(method)
        data = backend.config.for_bits(bits).to_dict() if bits is not None else {"quant_method": method}
        data.update(_parse_sets(sets))
        config = reg.config_from_dict(data)
        model = load(model_dir, config=config, device=device, progress=progress)
        out = save(
            model, output, max_shard_size=max_shard_size, extra_files=non_checkpoint_files(Path(model_dir))
        )
    except QuantplugError as exc:
        raise click.ClickException(str(exc)) from None
    info = model.quantplug_info
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    click.echo(
        f"quantized {len(info.modules)} module(s) with {config.quant_method} "
        f"({json.dumps(config.to_dict())}) in {time.perf_counter() - t0:.1f} s; "
        f"wrote {out} ({size / 2**20:.1f} MiB of weights)"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
