from quantplug.testing import BackendConformance


class TestBnbConformance(BackendConformance):
    backend_name = "bitsandbytes"
    configs = [
        ({"load_in_8bit": True}, 8),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, 4),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, 4),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, 4),
    ]
    bad_configs = [
        ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit"),
        ({}, "load_in_4bit"),
        ({"load_in_4bit": "yes"}, "load_in_4bit"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type"),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float8"}, "bnb_4bit_compute_dtype"),
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "int4"}, "bnb_4bit_quant_storage"),
        ({"load_in_8bit": True, "llm_int8_threshold": -1.0}, "llm_int8_threshold"),
        ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "llm_int8_has_fp16_weight"),
        ({"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"}, "llm_int8_skip_modules"),
        ({"load_in_8bit": True, "llm_int8_skip_modules": ["a("]}, "llm_int8_skip_modules"),
        (
            {"load_in_8bit": True, "llm_int8_skip_modules": ["a"], "modules_to_not_convert": ["b"]},
            "modules_to_not_convert",
        ),
        ({"load_in_8bit": True, "_load_in_8bit": False}, "load_in_8bit"),
    ]
    library_modules = ("bitsandbytes",)
