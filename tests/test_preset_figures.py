"""Issue 28 part 6: a preset's declared figures are what ``select`` ranks by, so the conformance kit
measures each preset on its own layer and fails a figure its layer contradicts.

The plugin here is what a third-party author could write by mistake (or on purpose): the real rtn
quantizer storing int4 under a preset that declares bits=8, 2.0 bits per weight and error 0.01.
Without the check, ``select`` believes it and sets the honest int8 preset aside as dominated.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

import quantplug
from quantplug.preset_check import (
    BPW_TOLERANCE,
    ERROR_SLACK,
    ERROR_TOLERANCE,
    LAYER_SHAPE,
    check_preset,
    figure_problems,
    measure_preset,
)
from quantplug.testing import BackendConformance
from quantplug_rtn.config import RtnConfig


@dataclasses.dataclass(frozen=True)
class AbsmaxConfig(RtnConfig):
    quant_method = "absmax"


LYING = quantplug.Preset("int4", {"bits": 4, "group_size": 128}, bits=8, bits_per_weight=2.0, rel_error=0.01)
HONEST = quantplug.Preset(
    "int8", {"bits": 8, "group_size": -1}, bits=8, bits_per_weight=8.02, rel_error=0.008
)


@pytest.fixture
def absmax(make_plugin) -> quantplug.Backend:
    """The third-party plugin, registered in this process (no entry point needed)."""

    def register_backends(register):
        register(
            quantplug.Backend(
                name="absmax",
                config=AbsmaxConfig,
                quantizer="quantplug_rtn.quantizer:RtnQuantizer",
                capabilities=quantplug.Capabilities(bits=(4, 8), max_rel_error={8: 0.02, 4: 0.16}),
                presets=(HONEST, LYING),
            )
        )

    quantplug.register_plugin(make_plugin(register_backends), name="quantplug-absmax")
    return quantplug.get_backend("absmax")


class AbsmaxKit(BackendConformance):
    backend_name = "absmax"
    configs = [({"bits": 4, "group_size": 128}, 4)]


def test_select_believes_what_is_declared(absmax):
    # the harm the kit now prevents: the honest preset is set aside for the lie
    sel = quantplug.select(7e9, device="cpu")
    reasons = {(r.backend, r.preset): r.reason for r in sel.rejected}
    assert reasons[("absmax", "int8")].startswith("dominated by absmax:int4: 2.0 vs 8.02 bits per weight")


def test_the_kit_fails_the_lying_preset_naming_each_figure(absmax):
    with pytest.raises(AssertionError) as err:
        AbsmaxKit().test_preset_figures_are_what_its_layer_measures("int4")
    lines = str(err.value).splitlines()
    assert all(
        line.startswith("preset 'int4' (measured on a float32 Linear(2048, 2048, bias=False))")
        for line in lines
    )
    text = str(err.value)
    assert "declares bits=8, measured 4: its integer grid (Quantizer.integer_grid) is 4-bit" in text
    bpw = re.search(r"declares bits_per_weight=2\.0, measured (\d+\.\d+) ", text)
    assert bpw and float(bpw.group(1)) == pytest.approx(4 + 32 / 128, abs=1e-3)  # int4 + fp32 scale / 128
    err_fig = re.search(r"declares rel_error=0\.01, measured (\d\.\d+) ", text)
    assert err_fig and 0.08 < float(err_fig.group(1)) < 0.16  # int4 round-to-nearest, not 0.01


def test_the_kit_passes_the_honest_preset(absmax):
    AbsmaxKit().test_preset_figures_are_what_its_layer_measures("int8")
    skip, problems = check_preset(absmax, "int8")
    assert skip is None and problems == []


def test_each_figure_fails_on_its_own_just_outside_the_tolerance(absmax):
    """The tolerances the kit states are the ones it applies: each declared figure is moved just
    inside and just outside its tolerance of the measured value."""
    m = measure_preset(absmax, HONEST)
    assert m.grid_bits == 8 and m.dtype == "float32"
    assert m.bits_per_weight == pytest.approx(8 + 32 / LAYER_SHAPE[1])  # int8 codes + an fp32 scale per row

    def problems(**figures):
        return figure_problems(dataclasses.replace(HONEST, **figures), m)

    bpw, err = m.bits_per_weight, m.rel_error
    assert problems(bits_per_weight=bpw * (1 + BPW_TOLERANCE * 0.9), rel_error=err) == []
    (bad,) = problems(bits_per_weight=bpw * (1 + BPW_TOLERANCE * 1.1), rel_error=err)
    assert "declares bits_per_weight=" in bad and f"measured {bpw:.3f}" in bad
    inside = err * (1 + ERROR_TOLERANCE) + ERROR_SLACK * 0.9
    assert problems(rel_error=inside, bits_per_weight=bpw) == []
    (bad,) = problems(rel_error=err * (1 - ERROR_TOLERANCE) - ERROR_SLACK * 1.1, bits_per_weight=bpw)
    assert "declares rel_error=" in bad and f"measured {err:.4f}" in bad
    (bad,) = problems(bits=4, bits_per_weight=bpw, rel_error=err)
    assert "declares bits=4, measured 8" in bad


def test_a_preset_without_rel_error_is_held_to_the_backend_bound(absmax):
    m = measure_preset(absmax, LYING)
    bound = {4: m.rel_error * 0.5}
    (bad,) = [
        p
        for p in figure_problems(dataclasses.replace(LYING, rel_error=None, bits=4), m, bound)
        if "rel_error" in p
    ]
    assert "declares no rel_error" in bad and "max_rel_error[4]" in bad
    assert not [
        p
        for p in figure_problems(dataclasses.replace(LYING, rel_error=None, bits=4), m, {4: 0.16})
        if "rel_error" in p
    ]


def test_a_preset_for_another_device_is_skipped_saying_why(absmax):
    gpu = dataclasses.replace(HONEST, name="gpu", devices=("cuda",))
    backend = dataclasses.replace(absmax, presets=(gpu,))
    skip, problems = check_preset(backend, "gpu", "cpu")
    assert skip == "preset 'gpu' runs on cuda, not on cpu" and problems == []
