"""Fixtures of the fault suite. See tests/faults/README.md for the CI and the long run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ._support import LONG


def pytest_report_header(config):
    return f"quantplug fault suite: {'LONG run (QUANTPLUG_FAULTS_LONG=1)' if LONG else 'CI-sized run'}"


@pytest.fixture
def copy_of(tmp_path):
    """``copy_of(folder, name="ckpt")``: a fresh copy of a checkpoint folder to damage."""

    def copy(folder: Path, name: str = "ckpt") -> Path:
        return Path(shutil.copytree(folder, tmp_path / name))

    return copy
