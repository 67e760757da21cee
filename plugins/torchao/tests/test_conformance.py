"""The conformance kit, for every torchao mode that runs on CPU.

int4_weight_only and float8 dynamic need CUDA: bench/gpu_check.py covers them where a GPU is available.
``bad_configs`` are refused when the config is built; ``library_bad_configs`` (values inside torchao's
``_data``) build, and are refused by the quantizer's check_config, with torchao imported, before any
layer is touched (the kit checks both).
"""

from quantplug.testing import BackendConformance
from quantplug_torchao.config import torchao_config_dict


def qt(mode, **kw):
    return {"quant_type": {"default": torchao_config_dict(mode, **kw)}}


def bad_inner(**changes):
    inner = torchao_config_dict("int8_weight_only")
    inner.update(changes)
    return {"quant_type": {"default": inner}}


def bad_data(mode, **data):
    inner = torchao_config_dict(mode)
    inner["_data"].update(data)
    return {"quant_type": {"default": inner}}


def bad_intx(**data):
    return bad_data("intx_weight_only", **data)


#: values inside _data are torchao's to check: each builds, and check_config refuses it (field quant_type)
LIBRARY_BAD_DATA = [
    bad_data("int8_weight_only", no_such_field=1),  # torchao: unexpected keyword
    bad_data("int8_weight_only", group_size=32),  # torchao: version 2 has no group_size
    bad_intx(granularity={"_type": "PerAxis", "_version": 1, "_data": {"axis": 1}}),  # torchao: axis 0 only
    bad_intx(mapping_type={"_type": "MappingType", "_data": "NO_SUCH"}),  # torchao: no such enum member
    # torchao accepts these, the plugin does not run them
    bad_intx(weight_dtype={"_type": "torch.dtype", "_data": "int1"}),
    bad_intx(intx_packing_format={"_type": "IntxPackingFormat", "_data": "OPAQUE_TORCHAO_AUTO"}),
    bad_intx(granularity={"_type": "PerGroup", "_version": 1, "_data": {"group_size": 0}}),
    bad_data("int8_weight_only", granularity={"_type": "PerTensor", "_version": 1, "_data": {}}),
    bad_data("float8_weight_only", weight_dtype={"_type": "torch.dtype", "_data": "float8_e5m2"}),
    bad_data("int4_weight_only", group_size=100),
    bad_data("int4_weight_only", int4_packing_format="no_such_format"),
]


def _library_bad(intx: bool) -> list:
    return [(d, "quant_type") for d in LIBRARY_BAD_DATA if ("Intx" in str(d)) == intx]


class TestTorchaoConformance(BackendConformance):
    backend_name = "torchao"
    library_modules = ("torchao",)
    configs = [
        (qt("int8_weight_only"), 8),
        (qt("int8_dynamic_activation_int8_weight"), 8),
        (qt("float8_weight_only"), 8),
    ]
    bad_configs = [
        ({"quant_type": "int8_weight_only"}, "quant_type"),  # the removed string form
        ({"quant_type": {"default": torchao_config_dict("int8_weight_only"), "lm_head": {}}}, "quant_type"),
        (bad_inner(_type="Int8DynamicActivationIntxWeightConfig"), "quant_type"),
        (bad_inner(_version=1), "quant_type"),
        (
            qt("intx_weight_only", bits=2) | {"include_input_output_embeddings": True},
            "include_input_output_embeddings",
        ),
        ({"quant_type_kwargs": {"group_size": 32}}, "quant_type_kwargs"),
        ({"untie_embedding_weights": "no"}, "untie_embedding_weights"),
    ]
    library_bad_configs = _library_bad(intx=False)


class TestTorchaoIntxConformance(BackendConformance):
    """intx weight-only. torchao stores it unpacked (IntxUnpackedToInt8Tensor: one value per int8
    byte), so a 4-bit layer takes 8 bits per weight plus its scales and zero points: the stored-bits
    allowance over the nominal width is raised for this class only."""

    backend_name = "torchao"
    library_modules = ("torchao",)
    max_overhead_bits = 8 - 2 + 1.5
    configs = [
        (qt("intx_weight_only", bits=4, group_size=32), 4),
        (qt("intx_weight_only", bits=2, group_size=64, symmetric=False), 2),
    ]
    library_bad_configs = _library_bad(intx=True)
    bad_configs = [
        (
            {"quant_type": {"default": {**qt("intx_weight_only")["quant_type"]["default"], "_data": []}}},
            "quant_type",
        ),
    ]
