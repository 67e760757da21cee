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


if __name__ == "__main__":  # pragma: no cover
    main()
