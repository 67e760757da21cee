"""VPTQ's own code (vptq 0.0.5.post1) as the oracle, loaded from its installed files without
importing the ``vptq`` package, whose ``__init__`` needs its CUDA build and heavy dependencies.

Where the files come from: ``$QUANTPLUG_VPTQ_REFERENCE`` (a folder holding ``vptq/``, e.g.
``pip install --no-deps --target DIR vptq==0.0.5.post1``, which tox's ``vptq`` env does), else an
installed ``vptq`` distribution (found with ``importlib.util.find_spec``, not imported).

What is run, unmodified:
- ``vptq/ops/quant_gemm.py`` (``quant_gemm``, ``dequant``), executed as the module ``vptq.ops.quant_gemm``.
  Its ``import vptq.libvptq`` fails here (the .so links libcudart.so.12), so it takes, as on any
  machine without CUDA, its torch implementation: ``dequant`` then ``F.linear``;
- ``vptq/layers/vqlinear.py`` (``VQuantLinear``), executed as ``vptq.layers.vqlinear``;
- from ``vptq/utils/pack.py``, only the function definitions ``pack_index`` and
  ``unpack_index_tensor`` (their source, compiled as they are): the module's top-level imports
  (sentence_transformers, accelerate, ``import vptq``) are not run; those two functions use only torch.

The ``vptq`` package modules exist in ``sys.modules`` only while these files are executed.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import torch

VERSION = "0.0.5.post1"
_CACHE: dict[str, types.SimpleNamespace] = {}


def reference_root() -> Path:
    where = os.environ.get("QUANTPLUG_VPTQ_REFERENCE")
    if where:
        root = Path(where)
    else:
        spec = importlib.util.find_spec("vptq")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                f"VPTQ's reference code is not installed: `pip install --no-deps --target DIR vptq=={VERSION}` "
                f"and set QUANTPLUG_VPTQ_REFERENCE=DIR (tox -e vptq does this)"
            )
        root = Path(next(iter(spec.submodule_search_locations))).parent
    if not (root / "vptq" / "ops" / "quant_gemm.py").exists():
        raise RuntimeError(f"{root}: no vptq/ops/quant_gemm.py (expected vptq=={VERSION}'s files)")
    return root


def _functions(path: Path, names: tuple[str, ...], module: types.ModuleType) -> None:
    """Compile only the top-level functions ``names`` of ``path`` into ``module``."""
    tree = ast.parse(path.read_text(), str(path))
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(n.name for n in body) == sorted(names), f"{path} lacks {names}"
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), module.__dict__)


def _package(name: str, folder: Path) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [str(folder)]
    return mod


def _run_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load() -> types.SimpleNamespace:
    """``VQuantLinear``, ``quant_gemm``, ``dequant``, ``pack_index``, ``unpack_index_tensor`` and
    whether the CUDA ops loaded (never here)."""
    root = reference_root()
    if str(root) in _CACHE:
        return _CACHE[str(root)]
    pkg = root / "vptq"
    saved = {k: v for k, v in sys.modules.items() if k == "vptq" or k.startswith("vptq.")}
    try:
        vptq = sys.modules["vptq"] = _package("vptq", pkg)
        vptq.utils = sys.modules["vptq.utils"] = _package("vptq.utils", pkg / "utils")
        pack = vptq.utils.pack = sys.modules["vptq.utils.pack"] = types.ModuleType("vptq.utils.pack")
        pack.torch, pack.math = torch, math
        _functions(pkg / "utils" / "pack.py", ("pack_index", "unpack_index_tensor"), pack)
        vptq.ops = sys.modules["vptq.ops"] = _package("vptq.ops", pkg / "ops")
        gemm = _run_file("vptq.ops.quant_gemm", pkg / "ops" / "quant_gemm.py")
        for key in gemm.__all__:  # what vptq/ops/__init__.py's `from .quant_gemm import *` does
            setattr(vptq.ops, key, getattr(gemm, key))
        vptq.layers = sys.modules["vptq.layers"] = _package("vptq.layers", pkg / "layers")
        vqlinear = _run_file("vptq.layers.vqlinear", pkg / "layers" / "vqlinear.py")
    finally:
        for k in [k for k in sys.modules if k == "vptq" or k.startswith("vptq.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    ref = types.SimpleNamespace(
        VQuantLinear=vqlinear.VQuantLinear,
        quant_gemm=gemm.quant_gemm,
        dequant=gemm.dequant,
        pack_index=pack.pack_index,
        unpack_index_tensor=pack.unpack_index_tensor,
        cuda_ops=bool(vars(gemm)["__cuda_ops_installed"]),
    )
    _CACHE[str(root)] = ref
    return ref
