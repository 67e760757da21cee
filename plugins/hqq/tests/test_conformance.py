from quantplug.testing import BackendConformance


class TestHqqConformance(BackendConformance):
    backend_name = "hqq"
    # Group sizes >= 64 keep fp32 scale + zero within the kit's 1.5 bits of overhead per weight.
    configs = [
        ({"nbits": 8, "group_size": 128}, 8),
        ({"nbits": 4, "group_size": 64}, 4),
        ({"nbits": 3, "group_size": 64, "view_as_float": True}, 3),
        ({"nbits": 2, "group_size": 64, "axis": 0}, 2),
    ]
    bad_configs = [
        ({"nbits": 5}, "nbits"),
        ({"nbits": "4"}, "nbits"),
        ({"group_size": 12}, "group_size"),
        ({"group_size": 0}, "group_size"),
        ({"axis": 2}, "axis"),
        ({"view_as_float": "yes"}, "view_as_float"),
        ({"skip_modules": "lm_head"}, "skip_modules"),
        ({"dynamic_config": {"self_attn.q_proj": {"nbits": 7}}}, "dynamic_config"),
        ({"dynamic_config": {"self_attn.q_proj": {"nbits": 4, "quant_zero": True}}}, "dynamic_config"),
        ({"dynamic_config": {"self_attn.q_proj": {"group_size": 20}}}, "dynamic_config"),
        ({"dynamic_config": {"self_attn.q_proj": 4}}, "dynamic_config"),
    ]
    library_modules = ("hqq",)
