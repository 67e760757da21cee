"""The shape of the code base, checked on the source (issue 14): short modules and functions, no
import cycle in the core, and plugins that use only the core's public API.

These are rules for people reading the code, so they are checked where people change it: a new
module over the limit, a cycle or a plugin reaching into a private core module fails here with the
place named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core" / "quantplug"
PLUGIN_PACKAGES = sorted(p.parent for p in (ROOT / "plugins").glob("*/quantplug_*/__init__.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
#: what a plugin may import from the core: the package itself and its public modules (CONTRIBUTING.md,
#: section 1, names the same ones): the module-name matcher, the conformance kit and the LoRA check
#: plugins' tests run (``trainable_test``, ``check_lora``)
PUBLIC_CORE_MODULES = {"quantplug", "quantplug.matching", "quantplug.testing", "quantplug.lora_check"}


def _sources() -> list[Path]:
    files = sorted(CORE.rglob("*.py"))
    for package in PLUGIN_PACKAGES:
        files += sorted(package.rglob("*.py"))
    return files


def _module_name(path: Path) -> str:
    """``core/quantplug/walk.py`` -> ``quantplug.walk``; a plugin's files likewise from its folder."""
    top = next(
        p for p in path.parents if (p / "__init__.py").exists() and not (p.parent / "__init__.py").exists()
    )
    parts = list(path.relative_to(top.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level and TYPE_CHECKING included),
    relative imports resolved."""
    in_package = (path.parent / "__init__.py").exists()
    package = _module_name(path).split(".") if in_package else []
    if in_package and path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x` is a module
    return out


def test_modules_and_functions_are_short():
    too_long = []
    for path in _sources():
        text = path.read_text()
        lines = text.count("\n") + 1
        where = path.relative_to(ROOT)
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{where}: {lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(
                        f"{where}:{node.lineno} {node.name}: {n} lines (limit {MAX_FUNCTION_LINES})"
                    )
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_the_core_import_graph_has_no_cycle():
    modules = {_module_name(p): p for p in sorted(CORE.rglob("*.py"))}
    graph = {
        name: sorted(m for m in _imports(path) if m in modules and m != name)
        for name, path in modules.items()
    }
    # the package's own __init__ may name its submodules (lazily); a submodule importing the
    # package (`from . import __version__`) is an edge back, so __init__ counts only as a leaf
    graph["quantplug"] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)


@pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=[p.name for p in PLUGIN_PACKAGES])
def test_plugins_use_only_the_public_core_api(package: Path):
    private = []
    files = sorted(package.rglob("*.py")) + sorted((package.parent / "bench").rglob("*.py"))
    for path in files:
        for module in _imports(path):
            top = module.split(".")
            if top[0] != "quantplug" or module in PUBLIC_CORE_MODULES:
                continue
            # `from quantplug import X` yields "quantplug.X": fine when X is an attribute, not a module
            if (CORE / Path(*top[1:])).with_suffix(".py").exists() or (CORE / Path(*top[1:])).is_dir():
                private.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not private, (
        "plugins may import only " + ", ".join(sorted(PUBLIC_CORE_MODULES)) + ":\n" + "\n".join(private)
    )


def test_contributing_names_only_the_public_core_modules():
    """CONTRIBUTING.md, the plugin author's guide, lists the public modules and points to no other
    module of the core (issue 28: it pointed to two modules a plugin may not import)."""
    import re

    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = re.findall(r"plus the public modules(.*?);", text, re.S)[0]
    listed = {m for m in section.split("`")[1::2] if m.startswith("quantplug.")}
    assert listed == PUBLIC_CORE_MODULES - {"quantplug"}
    named = {m.split(".")[1] for m in re.findall(r"`(quantplug(?:\.\w+)+)", text)}
    modules = {f"quantplug.{n}" for n in named if (CORE / f"{n}.py").exists() or (CORE / n).is_dir()}
    assert modules <= PUBLIC_CORE_MODULES, (
        f"CONTRIBUTING.md points to private modules: {sorted(modules - PUBLIC_CORE_MODULES)}"
    )


def test_no_public_name_shadows_a_submodule():
    import quantplug

    shadowing = [
        n for n in quantplug.__all__ if (CORE / f"{n}.py").exists() or (CORE / n / "__init__.py").exists()
    ]
    assert not shadowing, f"quantplug.{shadowing[0]} is both a public name and a submodule"
