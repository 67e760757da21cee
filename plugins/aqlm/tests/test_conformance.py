"""The load-only conformance kit on checkpoints aqlm's own module writes (tests/aqlm_ref.py), with
aqlm 1.1.7's CPU forward as the reference (its numba kernel for 2x8, dequantize_gemm for 1x16)."""

import aqlm_ref

from quantplug.testing import LoadOnlyConformance


class TestAqlmConformance(LoadOnlyConformance):
    backend_name = "aqlm"
    configs = [
        # 1x16, groups of 8: 2 bits per weight (ISTA-DASLab/Llama-2-7b-AQLM-2Bit-1x16-hf)
        {"in_group_size": 8, "out_group_size": 1, "num_codebooks": 1, "nbits_per_codebook": 16},
        # 2x8, groups of 8: 2 bits per weight (ISTA-DASLab/Llama-3.2-1B-Instruct-AQLM-PV-2Bit-2x8)
        {"in_group_size": 8, "out_group_size": 1, "num_codebooks": 2, "nbits_per_codebook": 8},
        # out groups of 2 (1 bit per weight): aqlm's dequantize_gemm is the reference
        {"in_group_size": 8, "out_group_size": 2, "num_codebooks": 1, "nbits_per_codebook": 16},
        # 2x8 with out groups of 2: aqlm's CPU forward is wrong here, _dequantize_weight + F.linear is the reference
        {"in_group_size": 4, "out_group_size": 2, "num_codebooks": 2, "nbits_per_codebook": 8},
    ]
    bad_configs = [
        ({"in_group_size": 0}, "in_group_size"),
        ({"out_group_size": -1}, "out_group_size"),
        ({"num_codebooks": 0}, "num_codebooks"),
        ({"nbits_per_codebook": 17}, "nbits_per_codebook"),
        ({"nbits_per_codebook": 0}, "nbits_per_codebook"),
        ({"in_group_size": "8"}, "in_group_size"),
        ({"linear_weights_not_to_quantize": "lm_head.weight"}, "linear_weights_not_to_quantize"),
        ({"linear_weights_not_to_quantize": [""]}, "linear_weights_not_to_quantize"),
        ({"linear_modules_not_to_quantize": ["lm_head"]}, "linear_modules_not_to_quantize"),
    ]
    library_modules = ("aqlm", "numba")

    def write_checkpoint(self, folder, config):
        return aqlm_ref.write(folder, config)
