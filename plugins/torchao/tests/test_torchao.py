"""torchao-specific behaviour: Transformers interop both ways, the stored config form, per-mode
device rules, layers that cannot be grouped, bit widths, version range, the GPU script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchao
from torchao.core.config import config_to_dict
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerGroup,
    PerRow,
)
from torchao.quantization.granularity import PerAxis

import quantplug
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug_torchao import TorchaoConfig
from quantplug_torchao.config import MODES, torchao_config_dict
from quantplug_torchao.quantizer import TorchaoLinear

PLUGIN_DIR = Path(__file__).resolve().parents[1]


# -- the stored config form is torchao's own ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "ao"),
    [
        ({"mode": "int8_weight_only"}, Int8WeightOnlyConfig()),
        ({"mode": "int8_dynamic_activation_int8_weight"}, Int8DynamicActivationInt8WeightConfig()),
        (
            {"mode": "int4_weight_only", "group_size": 64},
            Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"),
        ),
        (
            {"mode": "intx_weight_only", "bits": 3, "group_size": 64, "symmetric": False},
            IntxWeightOnlyConfig(
                weight_dtype=torch.int3,
                granularity=PerGroup(64),
                mapping_type=torchao.quantization.MappingType.ASYMMETRIC,
            ),
        ),
        (
            {"mode": "intx_weight_only", "bits": 6, "group_size": -1},
            IntxWeightOnlyConfig(weight_dtype=torch.int6, granularity=PerAxis(0)),
        ),
        ({"mode": "float8_weight_only"}, Float8WeightOnlyConfig()),
        ({"mode": "float8_dynamic_activation_float8_weight"}, Float8DynamicActivationFloat8WeightConfig()),
        (
            {"mode": "float8_dynamic_activation_float8_weight", "float8_granularity": "row"},
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        ),
    ],
)
def test_stored_form_is_torchaos_config_to_dict(kwargs, ao):
    mode = kwargs.pop("mode")
    assert torchao_config_dict(mode, **kwargs) == json.loads(json.dumps(config_to_dict(ao)))
    config = TorchaoConfig.from_mode(mode, **kwargs)
    assert config.mode == mode and config.torchao_type == type(ao).__name__
    # and the quantizer rebuilds an equal torchao config object from it
    assert quantplug.AutoQuantizer.from_config(config).ao_config == ao


def test_config_json_is_transformers_torchaoconfig_both_ways():
    from transformers import TorchAoConfig

    hf = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["lm_head", "mlp"])
    ours = quantplug.config_from_dict(json.loads(hf.to_json_string()))
    assert isinstance(ours, TorchaoConfig) and ours.mode == "int8_weight_only"
    assert ours.modules_to_not_convert == ("lm_head", "mlp")
    assert json.loads(json.dumps(ours.to_dict())) == json.loads(hf.to_json_string(use_diff=False)) | {
        "quant_method": "torchao"
    }
    back = TorchAoConfig.from_dict(ours.to_dict())
    assert back.quant_type == Int8WeightOnlyConfig() and back.modules_to_not_convert == ["lm_head", "mlp"]
    assert ours.to_transformers().to_dict() == back.to_dict()
    # Transformers 4.x also wrote an empty quant_type_kwargs: accepted, and not written back
    old = TorchaoConfig.from_dict({**ours.to_dict(), "quant_type_kwargs": {}})
    assert old == ours and "quant_type_kwargs" not in old.to_dict()


def test_friendly_constructors_and_their_errors():
    assert TorchaoConfig() == TorchaoConfig.from_mode("int8_weight_only") == TorchaoConfig.for_bits(8)
    c4 = TorchaoConfig.for_bits(4)
    assert (c4.mode, c4.weight_bits, c4.group_size) == ("intx_weight_only", 4, 32)
    c2 = TorchaoConfig.for_bits(2, modules_to_not_convert=[])
    assert c2.quant_type["default"]["_data"]["mapping_type"]["_data"] == "ASYMMETRIC"
    assert c2.modules_to_not_convert == ()
    with pytest.raises(quantplug.ConfigError, match="bits=1") as err:
        TorchaoConfig.for_bits(1)
    assert err.value.field == "bits"
    with pytest.raises(quantplug.ConfigError, match="mode='int3'"):
        TorchaoConfig.from_mode("int3")
    with pytest.raises(quantplug.ConfigError, match="group_size=100") as err:
        TorchaoConfig.from_mode("int4_weight_only", group_size=100)
    assert err.value.field == "group_size"
    with pytest.raises(quantplug.ConfigError, match="bits=4 is invalid for mode 'int8_weight_only'"):
        TorchaoConfig.from_mode("int8_weight_only", bits=4)
    assert set(MODES) == {TorchaoConfig.from_mode(m).mode for m in MODES}
    assert hash(TorchaoConfig()) == hash(TorchaoConfig.for_bits(8))


# -- per-mode device rules, checked before any module changes --------------------------------------


def test_float8_dynamic_on_cpu_fails_at_validation_naming_the_requirement():
    model = tiny_llama()
    config = TorchaoConfig.from_mode("float8_dynamic_activation_float8_weight")
    assert config.devices == ("cuda",)
    with pytest.raises(quantplug.BackendUnavailableError, match=r"compute capability >= 8\.9") as err:
        quantplug.quantize(model, config, progress=False)
    assert "does not run on 'cpu'" in str(err.value)
    assert not any(isinstance(m, TorchaoLinear) for m in model.modules()), "the model was changed"


@pytest.mark.parametrize(
    ("fmt", "needs"), [("tile_packed_to_4d", "a CUDA GPU"), ("plain_int32", "a CUDA GPU"), ("plain", "mslk")]
)
def test_int4_on_cpu_is_refused_with_the_reason(fmt, needs):
    config = TorchaoConfig.from_mode("int4_weight_only", int4_packing_format=fmt)
    quantizer = quantplug.AutoQuantizer.from_config(config)
    with pytest.raises(quantplug.BackendUnavailableError, match=needs):
        quantizer.validate_environment("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    quantizer = quantplug.AutoQuantizer.from_config(TorchaoConfig())
    with pytest.raises(quantplug.BackendUnavailableError, match="no usable CUDA"):
        quantizer.validate_environment("cuda")


# -- layers whose input does not split into whole groups ----------------------------------------


def test_ungroupable_layers_are_skipped_by_name_and_round_trip(tmp_path):
    model = tiny_llama(intermediate_size=200)  # down_proj: in_features 200, not a multiple of 64
    ids = token_ids()
    report = quantplug.quantize(model, TorchaoConfig.for_bits(4, group_size=64), progress=False)
    for i in (0, 1):
        name = f"model.layers.{i}.mlp.down_proj"
        assert "in_features=200 is not divisible by group_size=64" in report.skipped[name]
        assert type(model.get_submodule(name)) is torch.nn.Linear
    assert len(report.converted) == 12
    out = logits(model, ids)
    loaded = quantplug.load(quantplug.save(model, tmp_path / "ckpt"), progress=False)
    assert torch.equal(logits(loaded, ids), out)


# -- every declared bit width ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_each_bit_width_within_its_declared_bound(bits, group_size):
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 256)
    torch.nn.init.normal_(layer.weight, std=0.02)
    x = torch.randn(32, 512)
    config = TorchaoConfig.for_bits(bits, **({} if bits == 8 else {"group_size": group_size}))
    bound = quantplug.get_backend("torchao").capabilities.max_rel_error[bits]
    with torch.no_grad():
        ref = layer(x)
        q = quantplug.AutoQuantizer.from_config(config).quantize_module("layer", layer)
        rel = ((q(x) - ref).norm() / ref.norm()).item()
    assert rel <= bound, f"{bits} bits, group {group_size}: {rel:.4f} > {bound}"
    assert isinstance(q.weight, torchao.utils.TorchAOBaseTensor)
    assert not isinstance(layer.weight, torchao.utils.TorchAOBaseTensor), "the input layer was modified"


# -- Transformers <-> quantplug, int8 weight-only (and the other CPU modes Transformers saves) ------


def _layout(folder: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp") / "tiny"
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("mode", "ao"),
    [
        ("int8_weight_only", Int8WeightOnlyConfig()),
        ("int8_dynamic_activation_int8_weight", Int8DynamicActivationInt8WeightConfig()),
        ("intx_weight_only", IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))),
    ],
)
def test_transformers_checkpoint_loads_with_quantplug_identically(fp_checkpoint, tmp_path, mode, ao):
    from transformers import AutoModelForCausalLM, TorchAoConfig

    hf = AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=TorchAoConfig(ao), device_map="cpu"
    )
    hf.save_pretrained(tmp_path / "hf")
    ids = token_ids()
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", device_map="cpu"), ids)
    model = quantplug.load(tmp_path / "hf", progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, TorchaoLinear)
    assert model.quantplug_info.config.mode == mode
    assert torch.equal(logits(model, ids), expected)


def test_quantplug_checkpoint_loads_with_transformers_identically(fp_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, TorchAoConfig

    ids = token_ids()
    model = quantplug.load(fp_checkpoint, config=TorchaoConfig.from_mode("int8_weight_only"), progress=False)
    expected = logits(model, ids)
    ours = quantplug.save(model, tmp_path / "qp")
    # the same tensor names, shapes and dtypes Transformers writes for the same model and config
    hf = AutoModelForCausalLM.from_pretrained(
        fp_checkpoint, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu"
    )
    hf.save_pretrained(tmp_path / "hf")
    assert _layout(ours) == _layout(tmp_path / "hf")
    # torchao's per-tensor header entries, which Transformers needs to rebuild the subclasses
    from safetensors import safe_open

    with safe_open(str(ours / "model.safetensors"), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["model.layers.0.mlp.down_proj.weight"])["_type"] == "Int8Tensor"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        theirs = f.metadata()
    # every tensor named, as Transformers names them: vLLM loads only the tensors tensor_names names
    # (it served quantplug's checkpoints with NaN logits when the embeddings and norms were left out)
    names = json.loads(header["tensor_names"])
    assert sorted(names) == sorted(json.loads(theirs["tensor_names"]))
    assert all(json.loads(header[n])["_type"] == json.loads(theirs[n])["_type"] for n in names)
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    rebuilt, leftover = unflatten_tensor_state_dict(load_file(str(ours / "model.safetensors")), header)
    assert leftover == {} and sorted(rebuilt) == sorted(names)
    assert header["quant_method"] == "torchao"  # quantplug's own entries are kept
    loaded = AutoModelForCausalLM.from_pretrained(ours, device_map="cpu")
    assert type(loaded.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
    assert torch.equal(logits(loaded, ids), expected)
    assert torch.equal(logits(quantplug.load(ours, progress=False), ids), expected)


# -- supported version range ------------------------------------------------------------------------


def test_version_range_is_declared_and_checked(monkeypatch):
    backend = quantplug.get_backend("torchao")
    assert backend.requires == ("torchao>=0.18,<0.19",)
    assert backend.status.available and backend.status.library_versions["torchao"] == torchao.__version__
    # the imported module is checked too (metadata and import can disagree in broken environments)
    monkeypatch.setattr(torchao, "__version__", "0.14.1")
    with pytest.raises(
        quantplug.BackendUnavailableError, match=r"torchao 0\.14\.1 is imported.*>=0\.18,<0\.19"
    ):
        quantplug.AutoQuantizer.from_config(TorchaoConfig())


# -- the GPU script ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the clean skip on a machine without CUDA")
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(PLUGIN_DIR / "bench" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SKIP" in proc.stdout
    assert json.loads(out.read_text())["skipped"]


@pytest.mark.parametrize("preset_variable", [None, "1"], ids=["unset", "set-by-user"])
def test_torchao_import_prints_no_noise_once_quantplug_loaded_its_plugins(preset_variable):
    """Transformers imports torchao with its model classes; after quantplug loaded its plugins (as
    every CLI command does first), that import prints neither "Skipping import of cpp extensions"
    (issue 18: it showed although demo/run sets the variable) nor torch's Enum deprecation lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTPLUG_", "TORCHAO_"))}
    if preset_variable is not None:
        env["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = preset_variable
    code = (
        "import sys, quantplug; quantplug.backends()\n"
        "import transformers.modeling_utils\n"
        "assert 'torchao' in sys.modules, 'Transformers no longer imports torchao: rewrite this test'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Skipping import of cpp extensions" not in proc.stderr
    assert "register_constant() on Enum" not in proc.stderr
    if not Path("/dev/nvidiactl").exists():
        assert "Failed to load" not in proc.stderr  # the CUDA-built extensions were not tried


def test_compare_of_a_model_folder_prints_no_torchao_noise(tmp_path):
    """The demo's path: `compare` on a folder, select choosing the candidates. Loading the folder
    imports Transformers (and with it torchao), so quantplug loads its plugins first."""
    tiny_llama().save_pretrained(tmp_path / "tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTPLUG_", "TORCHAO_"))}
    env["TORCHAO_FORCE_SKIP_LOADING_SO_FILES"] = "1"  # as demo/run sets it
    code = (
        "import sys\nfrom quantplug.comparison import compare\n"
        f"compare({str(tmp_path / 'tiny')!r}, top=1, tokens=32, window=16, decode_tokens=1, repeats=1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Skipping import of cpp extensions" not in proc.stderr
    assert "register_constant() on Enum" not in proc.stderr
