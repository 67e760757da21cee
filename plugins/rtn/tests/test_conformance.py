from quantplug.testing import BackendConformance


class TestRtnConformance(BackendConformance):
    backend_name = "rtn"
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
