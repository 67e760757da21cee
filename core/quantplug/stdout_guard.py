"""The CLI's stdout holds only the command's product (its table, JSON or list).

Backend libraries print while they are imported, quantize and load: GPTQModel its banner and log
lines, others through ``print``, through logging handlers that captured ``sys.stdout`` when they
were imported, from C/C++ extensions writing to file descriptor 1, or from subprocesses. Guarding
each library would miss the next one, so every command runs inside ``guarded_stdout()``: file
descriptor 1 and ``sys.stdout`` lead to stderr for the whole run, and the command writes its
product with ``echo``, on a duplicate of the original descriptor. On the way out (errors included)
the pending library output is flushed to stderr and descriptor 1 is restored.

Where ``sys.stdout`` is not file descriptor 1 (``click.testing.CliRunner``, pytest's capture), the
guard swaps ``sys.stdout`` only: the product goes to the stream ``sys.stdout`` was.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import IO

import click

__all__ = ["GuardedCommand", "GuardedGroup", "echo", "guarded_stdout"]

# the product streams of the guards now active, innermost last
_products: list[IO[str] | None] = []


def echo(message: str) -> None:
    """Write ``message`` (and a newline) to the command's product: its stdout."""
    click.echo(message, file=_products[-1] if _products else None)


def _on_fd1(stream) -> bool:
    """Whether ``stream`` writes to file descriptor 1."""
    try:
        return stream is not None and stream.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def _flush_c_stdio() -> None:
    """Flush the C library's stdio buffers (a C extension's ``printf`` to a pipe is buffered there):
    written now, while descriptor 1 still leads to stderr, not at exit onto the product."""
    try:
        libc = ctypes.CDLL(None)
        libc.fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to reach this way (Windows)
        pass


@contextlib.contextmanager
def guarded_stdout() -> Iterator[IO[str] | None]:
    """Inside: ``sys.stdout`` and, where it is descriptor 1, descriptor 1 lead to stderr; ``echo``
    writes to the original stdout. Yields that product stream."""
    original = sys.stdout
    product, saved = original, None
    if _on_fd1(original):
        original.flush()
        sys.stderr.flush()
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
        except OSError:  # no descriptor 2 to lead to: sys.stdout alone is guarded
            os.close(saved)
            saved = None
        else:
            product = open(saved, "w", encoding=original.encoding, errors=original.errors)  # noqa: SIM115
    sys.stdout = sys.stderr
    _products.append(product)
    try:
        yield product
    finally:
        _products.pop()
        sys.stdout = original
        if saved is not None:
            _restore(original, product, saved)


def _restore(original, product, saved: int) -> None:
    """Flush what libraries left pending onto stderr, then point descriptor 1 back at the product."""
    with contextlib.suppress(OSError, ValueError):
        original.flush()  # a stale sys.stdout reference's buffer: still leads to stderr
    _flush_c_stdio()
    failure = None
    try:
        product.flush()
    except OSError as exc:  # the reader went away (`| head`): click exits 1 on EPIPE
        failure = exc
    os.dup2(saved, 1)
    with contextlib.suppress(OSError):
        product.close()
    if failure is not None:
        raise failure


class GuardedCommand(click.Command):
    """A command whose run (not its argument parsing, ``--help`` included) is ``guarded_stdout``."""

    def invoke(self, ctx: click.Context):
        with guarded_stdout():
            return super().invoke(ctx)


class GuardedGroup(click.Group):
    """A group whose subcommands are ``GuardedCommand`` by default."""

    command_class = GuardedCommand
