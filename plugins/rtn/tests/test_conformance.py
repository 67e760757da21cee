from quantplug.testing import BackendConformance


class TestRtnConformance(BackendConformance):
    backend_name = "rtn"
    # asymmetric g32 on the kit's fp32 layer: an fp32 scale and an fp32 zero (the group minimum) per
    # 32 weights, 2 bits over the nominal (bf16 weights: 1)
    max_overhead_bits = 2.0
    configs = [
        ({"bits": 8, "group_size": -1}, 8),
        ({"bits": 4, "group_size": 128}, 4),
        ({"bits": 4, "group_size": 32, "symmetric": False}, 4),
        ({"bits": 2, "group_size": 64, "symmetric": False}, 2),
    ]
    bad_configs = [
        ({"bits": 3}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"symmetric": "yes"}, "symmetric"),
    ]
