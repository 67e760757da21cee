"""The ``quantplug`` command line: ``list``, ``doctor``, ``select``, ``quantize``, ``compare``,
``export``, ``bench-presets``, ``kernels``.

``list``, ``doctor`` and ``select`` (with ``--device``) read plugin metadata only (no torch, no library).
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__, discovery, dispatch, plugin_env
from .cli_bench import bench_presets_cmd
from .cli_compare import compare_cmd, priority_option, workload_option
from .cli_kernels import kernels_cmd
from .hints import install_command
from .kernels import kernel_names
from .stdout_guard import GuardedGroup, echo


def _library_text(backend) -> str:
    versions = backend.status.library_versions
    if not backend.requires:
        return "-"
    return ", ".join(f"{name} {ver or '(missing)'}" for name, ver in versions.items()) or "-"


def _caps_text(caps) -> str:
    flags = [
        f"bits={','.join(map(str, caps.bits))}",
        f"devices={','.join(caps.devices) or 'none (see its note)'}",
    ]
    if caps.needs_calibration:
        flags.append("calibration")
    if caps.trainable:
        flags.append("trainable")
    if caps.serializable:
        flags.append("serializable")
    if not caps.quantizes and caps.devices:
        flags.append("load-only")
    return " ".join(flags)


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="quantplug")
def main() -> None:
    """Quantize PyTorch / Transformers models with any installed backend.

    Each command's stdout holds only its product (table, JSON, list); whatever a backend library
    prints goes to stderr."""


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(as_json: bool) -> None:
    """List installed backends, their plugin and library versions, status and capabilities."""
    backends = dispatch.backends()
    reg = discovery.registry()
    problems = reg.plugin_problems()
    ambiguous = {name: reg.owners(name) for name in sorted(reg.ambiguous)}
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
            "kernels": kernel_names(),
            "ambiguous_backends": ambiguous,
            "plugin_problems": [p.__dict__ for p in problems],
        }
        echo(json.dumps(out, indent=2))
        return
    if not backends:
        echo(_no_backends_text(reg))
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
        echo("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    for b in backends:
        if b.notes:
            echo(f"note: {b.name}: {b.notes}")
    echo(f"kernels: {', '.join(kernel_names())} (`quantplug kernels --presets`: which runs each preset)")
    for name, owners in ambiguous.items():
        echo(
            f"ambiguous: {name} is registered by {' and '.join(owners)}; neither is used (see `quantplug doctor`)"
        )
    if problems:
        click.echo(
            f"\n{len(problems)} plugin problem(s); run `quantplug doctor` for details and fixes.", err=True
        )


def _no_backends_text(reg) -> str:
    """Why ``list`` shows no backend: none installed, all disabled, or all names ambiguous."""
    disabled = [(p.name, p.error) for p in discovery.plugins() if p.status == "disabled"]
    if disabled:
        return plugin_env.all_disabled_message(disabled)
    if reg.ambiguous:
        return "No usable backends: every registered backend name is ambiguous (see below)."
    return (
        f"No backends installed. Install one, e.g. the reference backend: {install_command('quantplug-rtn')}"
    )


@main.command()
def doctor() -> None:
    """Report every plugin and backend problem with its fix. Exits 1 when there are problems."""
    discovery.verify_plugins()  # import every plugin: the descriptor cache must not hide a broken one
    echo(f"quantplug {__version__}, Python {sys.version.split()[0]}")
    for p in discovery.plugins():
        where = f"{p.dist} {p.version}" if p.dist else p.module
        ambiguous = discovery.registry().ambiguous
        names = [f"{b} (ambiguous)" if b in ambiguous else b for b in p.backends]
        detail = f" -> backends: {', '.join(names)}" if names else ""
        if p.status != "loaded":
            detail = f" ({p.error})"
        if p.import_seconds is not None:
            detail += f" [import {p.import_seconds * 1e3:.0f} ms]"
        echo(f"  plugin {p.name} [{where}]: {p.status}{detail}")
    notes = [b for b in dispatch.backends() if b.notes]
    for b in notes:
        echo(f"  note: {b.name}: {b.notes}")
    from .integrations.guard import hook_status

    hook_ok, hook_text = hook_status()
    echo(f"  {hook_text}")
    problems = discovery.problems() + ([] if hook_ok else [hook_text])
    if not problems:
        echo("No problems found.")
        return
    echo(f"\n{len(problems)} problem(s):")
    for p in problems:
        echo(f"- {p}")
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


@main.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-f",
    "--format",
    "fmt",
    required=True,
    help="Target format (a backend that can be one), e.g. compressed-tensors.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Output checkpoint folder."
)
@click.option(
    "--requantize",
    metavar="PRESET",
    help="Re-quantize (lossy) the layers the format cannot hold as they are, with this preset of the "
    "format (e.g. W4A16); without it such layers are an error.",
)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def export_cmd(model_dir, fmt, output, requantize, max_shard_size, progress) -> None:
    """Re-encode a quantized checkpoint in another format without going back to full precision
    (e.g. rtn or GPTQ -> compressed-tensors, which vLLM serves)."""
    import time

    from .errors import QuantplugError
    from .exporting import export

    t0 = time.perf_counter()
    try:
        out = export(
            model_dir,
            output,
            format=fmt,
            requantize=requantize,
            max_shard_size=max_shard_size,
            progress=progress,
        )
    except QuantplugError as exc:
        raise click.ClickException(str(exc)) from None
    qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    echo(
        f"exported {model_dir} as {fmt} ({len(qc.get('config_groups') or {})} group(s)) in "
        f"{time.perf_counter() - t0:.1f} s; wrote {out}"
    )


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-m", "--method", required=True, help="Backend (quant_method), e.g. rtn; see `quantplug list`.")
@click.option("-b", "--bits", type=int, help="Weight bits; the backend picks its config for that width.")
@click.option("-p", "--preset", help="One of the backend's presets (see `quantplug select`), e.g. nf4.")
@click.option(
    "-s", "--set", "sets", multiple=True, metavar="KEY=VALUE", help="A config key (JSON value); repeatable."
)
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Output checkpoint folder."
)
@click.option("--device", default="cpu", show_default=True, help="Device to quantize on.")
@click.option(
    "--calibration-text",
    type=click.Path(exists=True, dir_okay=False),
    help="Text file for configs that need calibration (GPTQ), tokenized with MODEL_DIR's tokenizer.",
)
@click.option("--calibration-tokens", type=click.IntRange(min=16), default=2048, show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def quantize(
    model_dir, method, bits, preset, sets, output, device, calibration_text, calibration_tokens, max_shard_size,
    progress,
) -> None:  # fmt: skip
    """Quantize a full-precision checkpoint folder while reading it, and save the result.

    With --calibration-text the model is loaded in full precision first and calibrated on the
    file's first --calibration-tokens tokens (in 512-token batches). Tokenizer and other non-weight
    files of MODEL_DIR are copied to the output."""
    import time
    from pathlib import Path

    from .checkpoint import non_checkpoint_files
    from .errors import AlreadyQuantizedError, QuantplugError
    from .loading import load
    from .saving import save
    from .walk import quantized_info

    t0 = time.perf_counter()
    try:
        backend = dispatch.get_backend(method)
        if preset is not None and bits is not None:
            raise click.UsageError("give --bits or --preset, not both")
        if preset is not None:
            from .candidates import resolve

            data = resolve(f"{backend.name}:{preset}").config.to_dict()
        elif bits is not None:
            data = backend.config.for_bits(bits).to_dict()
        else:
            data = {"quant_method": method}
        data.update(_parse_sets(sets))
        config = dispatch.config_from_dict(data)
        if dispatch.AutoQuantizer.from_config(config).needs_calibration() or calibration_text:
            calibration = (calibration_text, calibration_tokens)
            model = _calibrated(model_dir, config, calibration, device, progress)
        else:
            model = load(model_dir, config=config, device=device, progress=progress)
        out = save(
            model, output, max_shard_size=max_shard_size, extra_files=non_checkpoint_files(Path(model_dir))
        )
    except AlreadyQuantizedError as exc:
        raise click.ClickException(
            f"{model_dir} is already quantized (quant_method {exc.value!r}): `quantplug quantize` needs a "
            f"full-precision checkpoint. Quantize its full-precision original; this folder is usable as it is."
        ) from None
    except QuantplugError as exc:
        raise click.ClickException(str(exc)) from None
    info = quantized_info(model)
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    echo(
        f"quantized {len(info.modules)} module(s) with {config.quant_method} "
        f"({json.dumps(config.to_dict())}) in {time.perf_counter() - t0:.1f} s; "
        f"wrote {out} ({size / 2**20:.1f} MiB of weights)"
    )


def _calibrated(model_dir, config, calibration, device, progress):
    """The full-precision model of ``model_dir``, quantized with calibration batches of the text file."""
    from pathlib import Path

    from .comparison import calibration_batches
    from .convert import quantize
    from .loading import load
    from .text_quality import encode

    text_file, n_tokens = calibration
    if not text_file:
        raise click.UsageError(
            f"{config.quant_method} with these settings needs calibration data: pass --calibration-text FILE "
            f"(representative text; its first --calibration-tokens tokens are used)"
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise click.ClickException(
            f"--calibration-text needs {model_dir}'s tokenizer, which did not load ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); save the tokenizer into the folder"
        ) from None
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    ids, _ = encode(text, tokenizer, None, n_tokens)
    if ids.numel() < 16:
        raise click.UsageError(
            f"--calibration-text {text_file} gives {ids.numel()} tokens; at least 16 are needed"
        )
    model = load(model_dir, device=device, progress=progress)
    quantize(model, config, device=device, progress=progress, calibration_data=calibration_batches(ids, 512))
    return model


@main.command("select")
@click.argument("model", required=False)
@click.option("--params", type=float, help="Parameter count instead of MODEL, e.g. 7e9.")
@click.option("--device", help="cpu, cuda, cuda:N or mps (default: detected; detection imports torch).")
@click.option("--memory", "memory", help="Memory budget for the weights, e.g. 5GB or 12GiB.")
@click.option("--finetune", is_flag=True, help="Only backends whose layers can train adapters (LoRA).")
@click.option("--calibration-data", is_flag=True, help="You can provide calibration data.")
@click.option(
    "--serve",
    metavar="ENGINE",
    help="Only presets whose checkpoints ENGINE (vllm, sglang, tgi, or one a plugin declares) reads as "
    "`quantplug quantize` writes them, without conversion, as their plugins declare; the others are "
    "rejected, naming the installed presets ENGINE serves.",
)
@workload_option
@priority_option
@click.option(
    "--declared-speed",
    is_flag=True,
    help="Rank by the speed figures the plugins declare, not those `quantplug bench-presets` measured here.",
)
@click.option("--top", type=click.IntRange(min=1), help="Show only the first N candidates.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def select_cmd(
    model, params, device, memory, finetune, calibration_data, serve, workload, priority, declared_speed, top,
    as_json,
):  # fmt: skip
    """Rank the installed backends for MODEL (a model folder, its config.json or a parameter count)
    from what each plugin declares (speeds: those `quantplug bench-presets` measured on this machine
    where it stored them), with the reason for every place and every rejection."""
    from .errors import QuantplugError
    from .selection import select

    if (model is None) == (params is None):
        raise click.UsageError("give MODEL (a folder, config.json or parameter count) or --params, not both")
    try:
        sel = select(
            params if params is not None else model,
            device=device,
            memory_budget=memory,
            finetune=finetune,
            calibration_data=calibration_data,
            workload=workload,
            priority=priority,
            serve=serve,
            local_speed=not declared_speed,
        )
    except QuantplugError as exc:
        raise click.ClickException(str(exc)) from None
    if top is not None:
        sel.candidates = sel.candidates[:top]
    if as_json:
        echo(json.dumps(sel.to_dict(), indent=2))
    else:
        echo(sel.table())
    if not sel.candidates:
        sys.exit(1)


main.add_command(compare_cmd)
main.add_command(bench_presets_cmd)
main.add_command(kernels_cmd)

if __name__ == "__main__":  # pragma: no cover
    main()
