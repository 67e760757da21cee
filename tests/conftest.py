"""Shared fixtures for the core tests.

Every test starts and ends with a freshly loaded plugin registry (``quantplug.reload_plugins()``)
and with no ``QUANTPLUG_*`` environment variable set but ``QUANTPLUG_CACHE_DIR`` (an empty folder),
so programmatic registrations and env-var experiments never leak from one test into another.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Iterable
from typing import Any

import pytest

import quantplug


@pytest.fixture(scope="session")
def empty_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache folder holding no speed figures (``quantplug bench-presets``): the figures measured on
    the developer's machine must not change what ``select`` ranks in the tests."""
    return str(tmp_path_factory.mktemp("empty-quantplug-cache"))


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch: pytest.MonkeyPatch, empty_cache_dir: str):
    """Clear QUANTPLUG_* env vars (the cache folder: an empty one) and reload the registry before
    and after each test."""
    for var in list(os.environ):
        if var.startswith("QUANTPLUG_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("QUANTPLUG_CACHE_DIR", empty_cache_dir)
    quantplug.reload_plugins()
    yield
    quantplug.reload_plugins()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's wake-ups make
    each small op take milliseconds. torch is imported only by modules that use it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rtn_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load only the rtn plugin, whatever other plugins are installed (e.g. in the integration env),
    so tests can assert exact listings and an empty problem list."""
    monkeypatch.setenv("QUANTPLUG_PLUGINS", "rtn")
    quantplug.reload_plugins()


def _make_config_class(method: str) -> type[quantplug.QuantConfig]:
    @dataclasses.dataclass(frozen=True)
    class TestConfig(quantplug.QuantConfig):
        quant_method = method
        bits: int = 4

    TestConfig.__name__ = TestConfig.__qualname__ = f"TestConfig_{method.replace('-', '_').replace('.', '_')}"
    return TestConfig


@pytest.fixture
def make_config_class() -> Callable[[str], type[quantplug.QuantConfig]]:
    """``make_config_class("name")``: a fresh light QuantConfig subclass owning ``quant_method`` "name"."""
    return _make_config_class


@pytest.fixture
def make_backend() -> Callable[..., quantplug.Backend]:
    """``make_backend(name, **overrides)``: a valid Backend descriptor (its quantizer is the
    importable base class ``quantplug:Quantizer``, so no torch is needed) with fields overridden."""

    def make(name: str, **overrides: Any) -> quantplug.Backend:
        fields: dict[str, Any] = {
            "name": name,
            "config": _make_config_class(name),
            "quantizer": "quantplug:Quantizer",
            "capabilities": quantplug.Capabilities(bits=(4, 8)),
        }
        fields.update(overrides)
        return quantplug.Backend(**fields)

    return make


@pytest.fixture
def make_plugin() -> Callable[[Callable[..., None]], Any]:
    """``make_plugin(fn)``: a plugin object whose ``register_backends`` hook is ``fn(register)``."""

    def make(fn: Callable[..., None]) -> Any:
        return types.SimpleNamespace(register_backends=quantplug.hookimpl(fn))

    return make


@pytest.fixture
def plugin_registering(make_plugin) -> Callable[[Iterable[Any]], Any]:
    """``plugin_registering([b1, b2])``: a plugin whose hook registers each object given."""

    def make(objs: Iterable[Any]) -> Any:
        objs = list(objs)

        def register_backends(register):
            for obj in objs:
                register(obj)

        return make_plugin(register_backends)

    return make


@pytest.fixture
def subprocess_env(empty_cache_dir: str) -> Callable[..., dict[str, str]]:
    """``subprocess_env(pythonpath=None, **extra)``: os.environ without QUANTPLUG_* variables (the
    cache folder: an empty one), with ``pythonpath`` prepended to PYTHONPATH and ``extra`` variables
    set."""

    def make(pythonpath: str | os.PathLike | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTPLUG_")}
        env["QUANTPLUG_CACHE_DIR"] = empty_cache_dir
        if pythonpath is not None:
            parts = [os.fspath(pythonpath)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update(extra)
        return env

    return make


@pytest.fixture
def copy_of(tmp_path):
    """``copy_of(folder, name="ckpt")``: a fresh copy of a checkpoint folder (to damage or rewrite)."""
    import shutil
    from pathlib import Path

    def copy(folder, name: str = "ckpt") -> Path:
        return Path(shutil.copytree(folder, tmp_path / name))

    return copy


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory):
    """A saved rtn int4 tiny Llama: (folder, token ids, the quantized model's logits). Read-only:
    tests that damage a checkpoint work on a copy (``copy_of``)."""
    from quantplug.testing import logits, tiny_llama, token_ids
    from quantplug_rtn import RtnConfig

    model = tiny_llama()
    quantplug.quantize(model, RtnConfig(bits=4), progress=False)
    ids = token_ids()
    out = logits(model, ids)
    folder = quantplug.save(model, tmp_path_factory.mktemp("rtn") / "ckpt")
    return folder, ids, out
