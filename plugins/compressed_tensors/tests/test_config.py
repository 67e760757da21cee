"""``CompressedTensorsConfig`` against compressed-tensors itself: the light ``SCHEMES`` table is
what the library's presets are, ``to_dict()`` is what ``ModelCompressor.update_config`` writes, the
config round-trips, the package stays light, and quantplug's preset naming and ``select(serve=...)``
see the plugin."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import (
    preset_name_to_scheme,
)
from quantplug_compressed_tensors import PRESETS, SCHEMES, CompressedTensorsConfig
from quantplug_compressed_tensors.config import infer_format
from test_interop import write_with_library

import quantplug
from quantplug.selection import Hardware

NAMES = sorted(SCHEMES)

#: the keys ModelCompressor.update_config writes into config.json's quantization_config
UPDATE_CONFIG_KEYS = {
    "config_groups",
    "format",
    "global_compression_ratio",
    "ignore",
    "kv_cache_scheme",
    "moe_sparsity_config",
    "quant_method",
    "quantization_status",
    "sparsity_config",
    "transform_config",
    "version",
}


def _config(**kwargs) -> CompressedTensorsConfig:
    return CompressedTensorsConfig(**kwargs)


# -- (a) the SCHEMES table is the library's presets ---------------------------------------------


def _assert_matches(ours, theirs, where: str) -> None:
    """``ours`` equals ``theirs`` on every key ``ours`` has; keys only ``theirs`` has are None."""
    if not isinstance(ours, dict):
        assert ours == theirs, f"{where}: table {ours!r}, compressed-tensors {theirs!r}"
        return
    assert isinstance(theirs, dict), f"{where}: table has a mapping, compressed-tensors {theirs!r}"
    for key, value in ours.items():
        assert key in theirs, f"{where}.{key}: in the table, not in compressed-tensors' dump"
        _assert_matches(value, theirs[key], f"{where}.{key}")
    extra = {k: v for k, v in theirs.items() if k not in ours and v is not None}
    assert not extra, f"{where}: compressed-tensors sets keys the table lacks: {extra}"


@pytest.mark.parametrize("name", NAMES)
def test_scheme_table_is_the_library_preset(name):
    scheme = preset_name_to_scheme(name, ["Linear"])
    dump = scheme.model_dump()
    table = SCHEMES[name]
    assert set(dump) == set(table), f"{name}: group keys {sorted(table)} vs {sorted(dump)}"
    assert dump["format"] is None  # the preset leaves the format to the compressor
    _assert_matches({k: v for k, v in table.items() if k != "format"}, dump, name)


@pytest.mark.parametrize("name", NAMES)
def test_scheme_table_format_is_the_one_the_library_infers(name):
    scheme = preset_name_to_scheme(name, ["Linear"])
    library = infer_module_format(torch.nn.Linear, scheme).value
    assert SCHEMES[name]["format"] == library
    assert infer_format(SCHEMES[name]) == library
    assert infer_format(scheme.model_dump()) == library
    assert _config(scheme=name).format == library


# -- (b) to_dict is what ModelCompressor.update_config writes ---------------------------------


def _library_quantization_config(folder, group: dict, ignore=("lm_head",)) -> dict:
    """The ``quantization_config`` compressed-tensors writes for a tiny Llama quantized with
    ``group`` (``test_interop.write_with_library``: llm-compressor's steps), read back."""
    write_with_library(folder, {"group_0": group}, ignore=ignore)
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def _library_group(name: str, group_size: int | None = None):
    scheme = preset_name_to_scheme(name, ["Linear"])
    if group_size is not None:
        scheme.weights.group_size = group_size
    return scheme


CASES = [({"scheme": n}, n, None) for n in NAMES] + [
    ({"scheme": "W4A16_ASYM", "group_size": 32}, "W4A16_ASYM", 32)
]


@pytest.mark.parametrize(
    "ours, name, group_size", CASES, ids=[json.dumps(c[0], sort_keys=True) for c in CASES]
)
def test_to_dict_is_what_model_compressor_writes(ours, name, group_size, tmp_path):
    library = _library_quantization_config(tmp_path / "lib", _library_group(name, group_size))
    written = _config(**ours).to_dict()
    assert set(library) == UPDATE_CONFIG_KEYS, sorted(library)  # the library's layout, as this test knows it
    assert set(written) == UPDATE_CONFIG_KEYS, sorted(written)
    for key in sorted(UPDATE_CONFIG_KEYS):
        assert written[key] == library[key], (
            f"{key}: ours {written[key]!r}, compressed-tensors {library[key]!r}"
        )
    assert json.loads(json.dumps(written)) == written  # JSON as it is


def test_library_written_config_parses_and_writes_back_unchanged(tmp_path):
    library = _library_quantization_config(tmp_path / "lib", _library_group("W4A16"))
    config = quantplug.config_from_dict(library)
    assert isinstance(config, CompressedTensorsConfig)
    assert config.to_dict() == library


def test_keys_another_tool_adds_are_kept_from_a_checkpoint_and_refused_from_a_user(tmp_path):
    folder = write_with_library(tmp_path / "lib", {"group_0": preset_name_to_scheme("W4A16", ["Linear"])})
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["provider"] = "some-tool"
    path.write_text(json.dumps(data))
    model = quantplug.load(folder, progress=False)
    again = quantplug.save(model, tmp_path / "again")
    written = json.loads((again / "config.json").read_text())["quantization_config"]
    assert written["provider"] == "some-tool"
    assert {k: v for k, v in written.items() if k != "provider"} == {
        k: v for k, v in data["quantization_config"].items() if k != "provider"
    }
    with pytest.raises(quantplug.ConfigError, match="unknown key.*'provider'"):
        quantplug.config_from_dict(data["quantization_config"])


#: llm-compressor 0.14's AWQ W4A16_ASYM group, as its checkpoints hold it (tests/test_zoo.py writes one)
_LLMCOMPRESSOR_ASYM = {
    **SCHEMES["W4A16_ASYM"],
    "weights": {
        **SCHEMES["W4A16_ASYM"]["weights"],
        "actorder": None,
        "block_structure": None,
        "observer": "memoryless_minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "zp_dtype": "torch.int8",
    },
}


def test_llmcompressor_group_with_zp_dtype_and_observer_parses_and_writes_back():
    """zp_dtype is how compressed-tensors >= 0.12 records an asymmetric int zero point; observer and
    observer_kwargs say how llm-compressor found the scales. Parsed, kept, written back."""
    data = {"quant_method": "compressed-tensors", "config_groups": {"group_0": _LLMCOMPRESSOR_ASYM}}
    config = quantplug.config_from_dict(data)
    assert config.to_dict()["config_groups"] == data["config_groups"]
    quantplug.AutoQuantizer.from_config(config)  # compressed-tensors' own validation accepts it


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        (
            "weights",
            "zp_dtype",
            "torch.uint8",
            r"weights\.zp_dtype='torch\.uint8'.*torch\.int8.*not supported",
        ),
        ("weights", "scale_dtype", "torch.uint8", r"weights\.scale_dtype='torch\.uint8'.*float scales"),
        ("weights", "scale_dtype", "torch.float8_e4m3fn", r"scale_dtype.*NVFP4 / MX"),
        ("weights", "observer", 3, r"weights\.observer=3: an observer name"),
        ("input_activations", "zp_dtype", "torch.uint8", r"input_activations\.zp_dtype"),
    ],
)
def test_stored_dtypes_it_cannot_read_are_refused_by_name(where, key, value, message):
    group = {**SCHEMES["W8A8"], where: {**SCHEMES["W8A8"][where], key: value}}
    with pytest.raises(quantplug.ConfigError, match=message):
        quantplug.config_from_dict({"quant_method": "compressed-tensors", "config_groups": {"g": group}})


@pytest.mark.parametrize(
    ("group", "where"),
    [
        (
            {**_LLMCOMPRESSOR_ASYM, "weights": {**_LLMCOMPRESSOR_ASYM["weights"], "observer": "mse"}},
            "weights",
        ),
        (
            {
                **SCHEMES["FP8"],
                "input_activations": {**SCHEMES["FP8"]["input_activations"], "observer": "minmax"},
            },
            "input_activations",
        ),
    ],
)
def test_quantizing_with_an_observer_it_does_not_compute_is_refused_before_any_layer(group, where):
    """Loading reads any observer (it only records how the stored scales were found); quantizing with
    one this plugin does not compute (mse; the moving-average minmax for static inputs) would silently
    give other scales."""
    from quantplug.testing import tiny_llama

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"quant_method": "compressed-tensors", "config_groups": {"g": {**group, "targets": ["Linear"]}}}
    with pytest.raises(
        quantplug.ConfigError, match=rf"\['g'\]\.{where}\.observer='(mse|minmax)'.*quantize with"
    ):
        calibration = [torch.zeros(1, 4, dtype=torch.long)] if where == "input_activations" else None
        quantplug.quantize(model, config, calibration_data=calibration)
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("proj"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- (c) round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"scheme": "W4A16"},
        {"scheme": "w8a8", "ignore": ["lm_head", "re:.*gate_proj"]},
        {
            "scheme": "W4A16_ASYM",
            "group_size": 64,
            "modules_to_not_convert": ["lm_head", "model.layers.0.mlp"],
        },
        {"scheme": "FP8"},
        {"config_groups": {"g": {**SCHEMES["W8A16"], "targets": ["re:.*self_attn.*"]}}, "ignore": []},
    ],
    ids=["W4A16", "w8a8-ignore", "W4A16_ASYM-g64-skip", "FP8", "config_groups"],
)
def test_round_trip(data):
    config = _config(**data)
    assert CompressedTensorsConfig.from_dict(config.to_dict()) == config
    assert quantplug.config_from_dict(json.loads(config.to_json())) == config


def test_scheme_shorthand_expands_to_config_groups():
    config = _config(scheme="w4a16-asym", group_size=64, modules_to_not_convert=["model.layers.0.mlp"])
    assert config.scheme is None and config.group_size is None
    assert config.config_groups["group_0"]["weights"]["group_size"] == 64
    assert config.config_groups["group_0"]["weights"]["symmetric"] is False
    assert config.ignore == ("lm_head", "model.layers.0.mlp")
    assert "scheme" not in config.to_dict() and "group_size" not in config.to_dict()


# -- (d) light import -------------------------------------------------------------------------


def test_import_does_not_import_torch_or_compressed_tensors():
    script = textwrap.dedent(
        """
        import json, sys
        import quantplug_compressed_tensors
        from quantplug_compressed_tensors import CompressedTensorsConfig
        CompressedTensorsConfig(scheme="W4A16").to_dict()
        heavy = ("torch", "compressed_tensors", "quantplug_compressed_tensors.quantizer",
                 "quantplug_compressed_tensors.layers")
        print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# -- (e) preset names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, preset", [("compressed-tensors:W4A16", "w4a16"), ("compressed-tensors:fp8_Dynamic", "fp8_dynamic")]
)
def test_preset_resolves_case_insensitively(spec, preset):
    from quantplug.candidates import resolve

    resolved = resolve(spec)
    assert resolved.label == f"compressed-tensors:{preset}"
    assert resolved.config == _config(**next(p.config for p in PRESETS if p.name == preset))


def test_presets_name_the_schemes_and_calibration():
    assert sorted(p.config["scheme"] for p in PRESETS) == NAMES
    backend = quantplug.get_backend("compressed-tensors")
    for p in PRESETS:
        assert p.name == p.config["scheme"].lower()
        declared = (
            backend.capabilities.needs_calibration if p.needs_calibration is None else p.needs_calibration
        )
        assert declared == _config(**p.config).static_activations(), p.name
        assert "vllm" in p.servable_by


# -- (f) select(serve="vllm") -------------------------------------------------------------------


def test_select_serve_vllm_ranks_compressed_tensors_presets():
    selection = quantplug.select(
        7e9, device=Hardware("cuda", cuda_capability=(9, 0)), serve="vllm", calibration_data=True
    )
    assert selection.serve == "vllm"
    assert selection.candidates, selection.table()
    ours = [c for c in selection.candidates if c.backend == "compressed-tensors"]
    assert ours, selection.table()
    for c in selection.candidates:
        assert "vllm" in c.servable_by
        assert any("vllm serves its checkpoints" in r for r in c.reasons), c.reasons
    # every preset is ranked or set aside for a reason other than serving
    names = {p.name for p in PRESETS}
    ranked = {c.preset for c in ours}
    set_aside = {r.preset: r.reason for r in selection.rejected if r.backend == "compressed-tensors"}
    assert ranked | set(set_aside) == names
    assert not [why for why in set_aside.values() if "does not serve" in why], set_aside
    assert selection.to_dict()["serve"] == "vllm"
    assert "served by vllm" in selection.table()


def test_select_serve_vllm_rejects_unserved_backends_naming_ours():
    selection = quantplug.select(7e9, device="cuda", serve="vllm")
    others = [r for r in selection.rejected if "does not serve" in r.reason]
    for r in others:
        assert "compressed-tensors:" in r.reason, r.reason
