from quantplug.testing import BackendConformance


class TestBitNetConformance(BackendConformance):
    backend_name = "bitnet"
    configs = [({}, 2), ({"linear_class": "autobitlinear"}, 2)]
    bad_configs = [
        ({"linear_class": "bitlinear", "quantization_mode": "online"}, "quantization_mode"),
        ({"linear_class": "ternary"}, "linear_class"),
        ({"quantization_mode": "dynamic"}, "quantization_mode"),
        ({"use_rms_norm": True, "rms_norm_eps": 0.0}, "rms_norm_eps"),
    ]
