"""The three configs: Transformers' keys both ways, round trips, and a ConfigError naming the field
for every value Transformers refuses (and for what quantplug checks on top)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from quantplug_gpu_formats import EetqConfig, HiggsConfig, SpQRConfig
from transformers.utils.quantization_config import EetqConfig as HfEetq
from transformers.utils.quantization_config import HiggsConfig as HfHiggs
from transformers.utils.quantization_config import SpQRConfig as HfSpQR

import quantplug

SHAPES = {
    "model.layers.0.mlp.up_proj.dense_weights.shape": 2048,
    "model.layers.0.mlp.up_proj.row_offsets.shape": 257,
    "model.layers.0.mlp.up_proj.col_vals.shape": 31,
    "model.layers.0.mlp.up_proj.in_perm.shape": 64,
}
TUNE = {"model.layers.0.mlp.up_proj": {"M": 1, "N": 256, "K": 512, "num_sms": 132, "template_id": 7}}

# (Transformers' config, the same as quantplug's dict)
SAME = [
    (HfSpQR(shapes=SHAPES, modules_to_not_convert=["lm_head"]), SpQRConfig),
    (HfHiggs(bits=3, p=1, group_size=128, hadamard_size=1024, tune_metadata=TUNE), HiggsConfig),
    (HfHiggs(bits=2, p=2, group_size=64, hadamard_size=512), HiggsConfig),
    (HfEetq(modules_to_not_convert=["lm_head", "model.layers.1.mlp"]), EetqConfig),
]


@pytest.mark.parametrize("hf,cls", SAME, ids=lambda v: getattr(v, "__name__", None) or type(v).__name__)
def test_a_transformers_config_reads_the_same_and_writes_back_what_transformers_reads(hf, cls):
    data = json.loads(hf.to_json_string(use_diff=False))
    ours = quantplug.config_from_dict(data)
    assert type(ours) is cls and not ours.extra
    for key in (f for f in data if f != "quant_method"):
        mine = getattr(ours, key)
        assert (list(mine) if isinstance(mine, tuple) else mine) == data[key], key
    back = type(hf).from_dict(ours.to_dict())  # Transformers' post_init accepts it
    assert json.loads(back.to_json_string(use_diff=False)) == data
    assert cls.from_dict(ours.to_dict()) == ours and cls.from_json(ours.to_json()) == ours


def test_defaults_are_transformers_defaults():
    for hf, ours in ((HfSpQR(), SpQRConfig()), (HfHiggs(), HiggsConfig()), (HfEetq(), EetqConfig())):
        data = json.loads(hf.to_json_string(use_diff=False))
        got = {k: v for k, v in ours.to_dict().items() if k in data}
        # Transformers writes {} for empty shapes / tune_metadata; quantplug's default is None (unset)
        want = {k: (None if v == {} else v) for k, v in data.items()}
        assert got == want


BAD = [
    ({"quant_method": "spqr", "bits": 4}, "bits"),
    ({"quant_method": "spqr", "bits": "3"}, "bits"),
    ({"quant_method": "spqr", "beta1": 8}, "beta1"),
    ({"quant_method": "spqr", "beta2": 32}, "beta2"),
    ({"quant_method": "spqr", "shapes": [1, 2]}, "shapes"),
    ({"quant_method": "spqr", "shapes": {"model.layers.0.q_proj.weight.shape": 3}}, "shapes"),
    ({"quant_method": "spqr", "shapes": {"dense_weights.shape": 3}}, "shapes"),
    ({"quant_method": "spqr", "shapes": {"m.in_perm.shape": -1}}, "shapes"),
    ({"quant_method": "spqr", "shapes": {"m.in_perm.shape": "64"}}, "shapes"),
    ({"quant_method": "higgs", "bits": 8}, "bits"),
    ({"quant_method": "higgs", "p": 3}, "p"),
    ({"quant_method": "higgs", "group_size": 32}, "group_size"),
    ({"quant_method": "higgs", "hadamard_size": 384}, "hadamard_size"),
    ({"quant_method": "higgs", "hadamard_size": 0, "group_size": 64}, "hadamard_size"),
    ({"quant_method": "higgs", "tune_metadata": {"m": 7}}, "tune_metadata"),
    ({"quant_method": "eetq", "weights": "int4"}, "weights"),
    ({"quant_method": "eetq", "weights": None}, "weights"),
    ({"quant_method": "eetq", "modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
    ({"quant_method": "eetq", "bits": 8}, "bits"),  # not a key of EETQ's config
]


@pytest.mark.parametrize("data,field", BAD, ids=[f"{d['quant_method']}-{f}" for d, f in BAD])
def test_a_bad_value_is_a_config_error_naming_the_field(data, field):
    with pytest.raises(quantplug.ConfigError) as err:
        quantplug.config_from_dict(data)
    assert err.value.field == field and field in str(err.value)


@pytest.mark.parametrize("bits,field", [(4, "bits"), (2, "bits")])
def test_spqr_refuses_what_transformers_refuses_too(bits, field):
    with pytest.raises(ValueError, match="bits = 3"):
        HfSpQR(bits=bits)  # the rule mirrored
    with pytest.raises(quantplug.ConfigError, match=field):
        SpQRConfig(bits=bits)


def test_eetq_for_bits_takes_only_8():
    assert EetqConfig.for_bits(8) == EetqConfig()
    with pytest.raises(quantplug.ConfigError, match="int8"):
        EetqConfig.for_bits(4)
    assert HiggsConfig.for_bits(2).bits == 2


def test_a_checkpoint_config_keeps_other_keys_and_a_user_config_refuses_them():
    data = {"quant_method": "higgs", "bits": 4, "example_key": 1}
    assert HiggsConfig.from_checkpoint(data).extra == {"example_key": 1}
    with pytest.raises(quantplug.ConfigError, match="example_key"):
        HiggsConfig.from_dict(data)


def test_the_configs_and_the_entry_point_import_no_torch():
    code = (
        "import sys, quantplug, quantplug_gpu_formats\n"
        "for m in ('spqr', 'higgs', 'eetq'):\n"
        "    quantplug.config_from_dict({'quant_method': m})\n"
        "    quantplug.get_backend(m)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
