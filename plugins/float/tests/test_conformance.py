from quantplug.testing import BackendConformance


class TestFp8Conformance(BackendConformance):
    backend_name = "fp8"
    # block 128 on the kit's 512-input layer: one float32 scale per 16384 weights; per tensor: one
    configs = [
        ({"weight_block_size": [128, 128]}, 8),
        ({"weight_block_size": None}, 8),
        ({"weight_block_size": [64, 32]}, 8),
    ]
    bad_configs = [
        ({"weight_block_size": [0, 128]}, "weight_block_size"),
        ({"weight_block_size": [128]}, "weight_block_size"),
        ({"activation_scheme": "perchannel"}, "activation_scheme"),
        ({"scale_fmt": "e5m2"}, "scale_fmt"),
        ({"expert_dtype": "fp4"}, "expert_dtype"),
        ({"modules_to_convert": ["model.embed_tokens"]}, "modules_to_convert"),
        ({"fmt": "e5m2"}, "fmt"),
    ]


class TestMxfp8Conformance(BackendConformance):
    backend_name = "mxfp8"
    configs = [({}, 8)]
    bad_configs = [({"weight_block_size": [128, 128]}, "weight_block_size")]


class TestFbgemmFp8Conformance(BackendConformance):
    backend_name = "fbgemm_fp8"
    configs = [({}, 8)]
    bad_configs = [({"activation_scale_ub": 0}, "activation_scale_ub")]
