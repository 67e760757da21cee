"""The conformance kit on auto-round (few tuning steps: the kit checks the contract, not quality)."""

from quantplug.testing import BackendConformance


class TestAutoRoundConformance(BackendConformance):
    backend_name = "auto-round"
    configs = [
        ({"bits": 4, "group_size": 128, "iters": 4}, 4),
        ({"bits": 8, "group_size": 64, "iters": 4}, 8),
    ]
    bad_configs = [
        ({"bits": 1}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"data_type": "mx_fp"}, "data_type"),
        ({"act_bits": 8}, "act_bits"),
        ({"packing_format": "auto_awq"}, "packing_format"),
        ({"seqlen": 0}, "seqlen"),
        ({"iters": -1}, "iters"),
        ({"bits": 8, "sym": False}, "sym"),
    ]
    library_bad_configs = [({"backend": "no-such-kernel"}, "backend")]
    library_modules = ("auto_round", "auto_round_kernel", "auto_round_extension")
