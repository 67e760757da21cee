from quantplug.testing import BackendConformance


class TestGptqConformance(BackendConformance):
    backend_name = "gptq"
    configs = [
        ({"bits": 4, "group_size": 128}, 4),
        ({"bits": 4, "group_size": 32, "sym": False, "desc_act": True}, 4),
        ({"bits": 8, "group_size": -1}, 8),
        ({"bits": 3, "group_size": 64, "format": "gptq_v2"}, 3),
    ]
    bad_configs = [
        ({"bits": 5}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 100}, "group_size"),
        ({"damp_percent": 1.5}, "damp_percent"),
        ({"format": "marlin"}, "format"),
        ({"format": "gptq_v2", "checkpoint_format": "gptq"}, "checkpoint_format"),
        ({"dynamic": {"model.layers.0.*": {"bits": 8}}}, "dynamic"),
        ({"lm_head": True}, "lm_head"),
        ({"pack_dtype": "int16"}, "pack_dtype"),
        ({"dataset": ["some text"]}, "dataset"),
        ({"modules_in_block_to_quantize": [[]]}, "modules_in_block_to_quantize"),
    ]
    library_bad_configs = [({"group_size": 24}, "group_size")]
    library_modules = ("gptqmodel",)
