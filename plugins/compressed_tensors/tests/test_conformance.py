import copy

from quantplug_compressed_tensors.config import SCHEMES

from quantplug.testing import BackendConformance


def _group(name: str, weights=None, **fields) -> dict:
    """One ``config_groups`` entry: preset ``name`` with ``weights`` keys and group ``fields`` replaced."""
    group = copy.deepcopy(SCHEMES[name])
    group["weights"].update(weights or {})
    group.update(fields)
    return {"group_0": group}


_INT8_TOKEN = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}


class TestCompressedTensorsConformance(BackendConformance):
    backend_name = "compressed-tensors"
    configs = [
        ({"scheme": "W4A16"}, 4),
        ({"scheme": "W4A16_ASYM", "group_size": 32}, 4),
        ({"scheme": "W8A16"}, 8),
        ({"scheme": "W8A8"}, 8),
        ({"scheme": "FP8_DYNAMIC"}, 8),
        ({"scheme": "FP8"}, 8),  # static input scales: the kit calibrates it
    ]
    bad_configs = [
        ({"scheme": "W3A16"}, "scheme"),
        ({"scheme": "W8A8", "group_size": 32}, "group_size"),
        ({"scheme": "W4A16", "group_size": 20}, "group_size"),
        ({"group_size": 64, "config_groups": _group("W4A16")}, "group_size"),
        ({"scheme": "W4A16", "config_groups": _group("W4A16")}, "config_groups"),
        ({"config_groups": {}}, "config_groups"),
        (
            {"scheme": "W4A16", "sparsity_config": {"format": "sparse-bitmask", "sparsity_structure": "2:4"}},
            "sparsity_config",
        ),
        (
            {
                "scheme": "W4A16",
                "transform_config": {"config_groups": {"u": {"type": "hadamard", "apply": []}}},
            },
            "transform_config",
        ),
        (
            {
                "scheme": "W4A16",
                "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
            },
            "kv_cache_scheme",
        ),
        ({"scheme": "W4A16", "moe_sparsity_config": {"format": "dense"}}, "moe_sparsity_config"),
        ({"scheme": "W4A16", "quantization_status": "frozen"}, "quantization_status"),
        ({"config_groups": _group("W8A8", output_activations=_INT8_TOKEN)}, "config_groups"),
        (  # NVFP4-style weights
            {
                "config_groups": _group(
                    "W4A16", {"type": "float", "strategy": "tensor_group", "group_size": 16}
                )
            },
            "config_groups",
        ),
        ({"config_groups": _group("W4A16", {"type": "float"})}, "config_groups"),  # FP4, group-wise
        (
            {"config_groups": _group("FP8", {"strategy": "block", "block_structure": [128, 128]})},
            "config_groups",
        ),
        ({"config_groups": _group("W4A16", {"actorder": "group"})}, "config_groups"),
        ({"config_groups": _group("W4A16", {"scale_dtype": "float8_e4m3fn"})}, "config_groups"),
        ({"config_groups": _group("W4A16", {"dynamic": True})}, "config_groups"),
        ({"config_groups": _group("W4A16", {"num_bits": "4"})}, "config_groups"),
        ({"config_groups": _group("W4A16", targets=[])}, "config_groups"),
        ({"config_groups": _group("W4A16", format="marlin-24")}, "config_groups"),
        ({"config_groups": _group("W4A16", format="int-quantized")}, "config_groups"),
        (  # W4AFP8: int weights with float inputs
            {"config_groups": _group("W4A16", input_activations=SCHEMES["FP8_DYNAMIC"]["input_activations"])},
            "config_groups",
        ),
        (  # static per-token inputs
            {"config_groups": _group("W8A8", input_activations={**_INT8_TOKEN, "dynamic": False})},
            "config_groups",
        ),
        ({"scheme": "W4A16", "format": "marlin-24"}, "format"),
        ({"scheme": "W4A16", "format": "float-quantized"}, "format"),
    ]
    # Pass the plugin's light checks; compressed-tensors' own QuantizationScheme validation
    # (Quantizer.check_config) refuses them.
    library_bad_configs = [
        # a group size on per-channel weights: "group_size requires strategy to be set to 'group'"
        ({"config_groups": _group("W8A8", {"group_size": 128})}, "config_groups"),
        # a key QuantizationArgs does not have (extra="forbid")
        ({"config_groups": _group("W4A16", {"no_such_arg": 1})}, "config_groups"),
    ]
    library_modules = ("compressed_tensors",)
