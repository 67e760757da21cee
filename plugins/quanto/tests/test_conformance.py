"""The conformance kit for quanto: int8 / int4 / int2 / float8 weights, int8 weights with
calibrated int8 activations, and float8 weights with calibrated float8 activations.

Activation configs need calibration data: the kit gives it (its ``calibration_data`` for the model
checks, other inputs of the same distribution for the one-layer checks).
"""

from quantplug.testing import BackendConformance


class TestQuantoConformance(BackendConformance):
    backend_name = "quanto"
    configs = [
        ({"weights": "int8"}, 8),
        ({"weights": "int4"}, 4),
        ({"weights": "int2"}, 2),
        ({"weights": "float8"}, 8),
        ({"weights": "int8", "activations": "int8"}, 8),
        ({"weights": "float8", "activations": "float8"}, 8),
    ]
    bad_configs = [
        ({"weights": "int3"}, "weights"),
        ({"weights": 4}, "weights"),
        ({"activations": "int4"}, "activations"),
        ({"activations": True}, "activations"),
    ]
    library_modules = ("optimum", "optimum.quanto")
