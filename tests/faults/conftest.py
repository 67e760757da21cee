"""Fixtures of the fault suite. See tests/faults/README.md for the CI and the long run."""

from __future__ import annotations

from ._support import LONG


def pytest_report_header(config):
    return f"quantplug fault suite: {'LONG run (QUANTPLUG_FAULTS_LONG=1)' if LONG else 'CI-sized run'}"
