"""The Transformers bridge: quantplug backends that Transformers does not know load through
``AutoModelForCausalLM.from_pretrained`` and save with ``save_pretrained``, interchangeably with
``quantplug.quantize`` / ``save`` / ``load``.

Uses the real ``rtn`` plugin (not in Transformers' roster) and a third-party-style int8 backend
defined here and registered with ``quantplug.register_backend``. Transformers' quantizer registry
is process-wide and cannot forget a name, so every programmatic backend gets a unique name; the
"fresh process" checks run in a child interpreter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.quantizers import auto as hf_auto  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import quantplug  # noqa: E402
from quantplug.integrations.transformers import (  # noqa: E402
    QuantplugHfConfig,
    QuantplugHfQuantizer,
    bridged_methods,
    register_with_transformers,
    to_transformers,
    transformers_methods,
)
from quantplug_rtn import RtnConfig  # noqa: E402

hf_logging.disable_progress_bar()

RTN = RtnConfig(bits=4, group_size=32)
HERE = Path(__file__).parent


# -- a third-party-style backend: int8 per output channel -----------------------------------------


class Int8Linear(nn.Module):
    """int8 codes per output channel: ``weight`` int8 [out, in], ``scale`` [out], optional ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.scale.to(x.dtype).unsqueeze(1)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class Int8Quantizer(quantplug.Quantizer):
    """Checkpoint layout = the module's state_dict (the default)."""

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        w = module.weight.detach()
        q = Int8Linear(w.shape[1], w.shape[0], module.bias is not None, w.dtype, w.device)
        scale = (w.float().abs().amax(dim=1) / 127).clamp_min(1e-12)
        q.weight.copy_(torch.round(w.float() / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8))
        q.scale.copy_(scale.to(w.dtype))
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        return q

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        return Int8Linear(
            module.in_features, module.out_features, module.bias is not None, module.weight.dtype, "meta"
        )


class Int8RenamedQuantizer(Int8Quantizer):
    """Same module, but a checkpoint layout of its own (``codes``/``scales``/``b``): what a backend
    that flattens tensor subclasses does. Exercises ``module_tensors``/``load_module``."""

    def module_tensors(self, name, qmodule):
        out = {"codes": qmodule.weight, "scales": qmodule.scale}
        if qmodule.bias is not None:
            out["b"] = qmodule.bias.detach()
        return out

    def expected_tensors(self, name, module):
        empty = self.empty_module(name, module)
        return {k: (tuple(t.shape), t.dtype) for k, t in self.module_tensors(name, empty).items()}

    def load_module(self, name, module, tensors):
        q = Int8Linear(
            module.in_features, module.out_features, module.bias is not None, module.weight.dtype, "meta"
        )
        q.weight, q.scale = tensors["codes"], tensors["scales"]
        if module.bias is not None:
            q.bias = nn.Parameter(tensors["b"], requires_grad=False)
        return q


def make_int8_backend(
    name: str, *, renamed: bool = False, requires: tuple[str, ...] = (), **caps
) -> quantplug.Backend:
    """A Backend descriptor owning ``name`` (a fresh config class each time, as a plugin would have)."""

    @dataclasses.dataclass(frozen=True)
    class Int8Config(quantplug.QuantConfig):
        quant_method = name
        bits: int = 8

        def validate(self) -> None:
            if self.bits != 8:
                raise self.invalid("bits", "8")

    quantizer = "Int8RenamedQuantizer" if renamed else "Int8Quantizer"
    return quantplug.Backend(
        name=name,
        config=Int8Config,
        quantizer=f"{__name__}:{quantizer}",
        capabilities=quantplug.Capabilities(bits=(8,), **caps),
        requires=requires,
        description="test int8 backend",
    )


def unique(prefix: str = "tp-int8") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (biases on, untied head), saved in fp32 with save_pretrained."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def quantplug_reference(fp_dir: Path, config) -> nn.Module:
    """The same weights quantized by quantplug.quantize."""
    model = AutoModelForCausalLM.from_pretrained(fp_dir)
    quantplug.quantize(model, config, progress=False)
    return model


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]


def checkpoint_keys(path: Path) -> dict[str, str]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


# -- rtn, the real plugin -------------------------------------------------------------------------


def test_rtn_is_bridged_and_transformers_methods_are_not():
    register_with_transformers()
    assert "rtn" in bridged_methods()
    assert "rtn" not in transformers_methods()
    assert issubclass(hf_auto.AUTO_QUANTIZER_MAPPING["rtn"], QuantplugHfQuantizer)
    assert issubclass(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["rtn"], QuantplugHfConfig)
    assert {"hqq", "bitsandbytes", "torchao", "quanto"} <= transformers_methods()


def test_from_pretrained_quantizes_like_quantplug(fp_dir, ids):
    register_with_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=RTN
    )  # the quantplug config itself
    names = linear_names(model)
    assert len(names) == 14
    assert all(type(model.get_submodule(n)).__name__ == "RtnLinear" for n in names)
    assert type(model.lm_head) is nn.Linear
    assert model.config.quantization_config.quantplug_config == RTN
    info = model.quantplug_info
    assert sorted(info.modules) == sorted(names) and info.config == RTN
    assert torch.equal(logits(model, ids), logits(quantplug_reference(fp_dir, RTN), ids))


def test_from_pretrained_accepts_the_transformers_config_and_a_dict(fp_dir, ids):
    register_with_transformers()
    expected = logits(quantplug_reference(fp_dir, RTN), ids)
    for config in (to_transformers(RTN), {"quant_method": "rtn", "bits": 4, "group_size": 32}):
        model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)
        assert torch.equal(logits(model, ids), expected)


def test_save_pretrained_loads_with_from_pretrained_and_quantplug_load(fp_dir, ids, tmp_path):
    register_with_transformers()
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=RTN)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "q")

    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"] == RTN.to_dict()
    keys = checkpoint_keys(tmp_path / "q")
    assert keys["model.layers.0.self_attn.q_proj.qweight"] == "U8"
    assert {"model.layers.0.self_attn.q_proj.scale", "model.layers.0.self_attn.q_proj.bias"} <= set(keys)
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert f.metadata()["quant_method"] == "rtn" and f.metadata()["plugin"] == "quantplug-rtn"

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(again.model.layers[1].mlp.down_proj).__name__ == "RtnLinear"
    assert again.model.layers[1].mlp.down_proj.qweight.dtype == torch.uint8
    assert not again.model.layers[0].self_attn.q_proj.bias.requires_grad  # as the backend builds it
    assert (logits(again, ids) - expected).abs().max().item() == 0
    loaded = quantplug.load(tmp_path / "q", progress=False)
    assert (logits(loaded, ids) - expected).abs().max().item() == 0


def test_quantplug_save_loads_with_from_pretrained(fp_dir, ids, tmp_path):
    register_with_transformers()
    reference = quantplug_reference(fp_dir, RTN)
    quantplug.save(reference, tmp_path / "qp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "qp")
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "RtnLinear"
    assert (logits(model, ids) - logits(reference, ids)).abs().max().item() == 0
    # and it saves again through quantplug (QuantizedModelInfo is attached)
    quantplug.save(model, tmp_path / "again")
    assert (
        logits(quantplug.load(tmp_path / "again", progress=False), ids) - logits(reference, ids)
    ).abs().max() == 0


def test_bf16_and_asymmetric_round_trip(fp_dir, ids, tmp_path):
    register_with_transformers()
    config = RtnConfig(bits=4, group_size=32, symmetric=False)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config, dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.k_proj
    # the asymmetric zero is the group minimum, stored in the weight dtype (issue 20 item 6)
    assert (layer.scale.dtype, layer.zero.dtype, layer.bias.dtype) == (
        torch.bfloat16,
        torch.bfloat16,
        torch.bfloat16,
    )
    model.save_pretrained(tmp_path / "q")
    expected = logits(model, ids)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.model.layers[0].self_attn.k_proj.zero.dtype == torch.bfloat16
    assert torch.equal(logits(again, ids), expected)
    assert torch.equal(logits(quantplug.load(tmp_path / "q", progress=False), ids), expected)


@pytest.mark.parametrize("arch", ["gpt2", "tied-llama"])
def test_conv1d_and_a_quantized_tied_head_round_trip(arch, ids, tmp_path):
    """GPT-2: Conv1D layers, and an ``_init_weights`` that reaches into ``attn.c_proj.weight``; a tied
    ``lm_head`` quantized on request (``modules_to_not_convert=[]``) can no longer be tied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    register_with_transformers()
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    else:
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=1,
            num_attention_heads=4,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "fp")
    config = RtnConfig(bits=4, group_size=32, modules_to_not_convert=[])
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    assert type(quantized.lm_head).__name__ == "RtnLinear"
    expected = logits(quantized, ids)
    assert torch.equal(expected, logits(quantplug_reference(tmp_path / "fp", config), ids))
    quantized.save_pretrained(tmp_path / "q")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids), expected)
    assert torch.equal(logits(quantplug.load(tmp_path / "q", progress=False), ids), expected)


# -- the generated config -------------------------------------------------------------------------


def test_generated_config_wraps_quantplug_config():
    register_with_transformers()
    cls = hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["rtn"]
    cfg = cls(bits=8, group_size=64)
    assert cls.__name__ == "RtnConfig" and cfg.quant_method == "rtn"
    assert cfg.quantplug_config == RtnConfig(bits=8, group_size=64)
    assert cfg.to_dict() == RtnConfig(bits=8, group_size=64).to_dict()
    assert cfg.bits == 8 and cfg.modules_to_not_convert is None
    assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(quantplug.ConfigError, match="bits"):
        cls(bits=3)
    with pytest.raises(quantplug.ConfigError, match="unknown key"):
        cls(bits=4, colour="red")
    cfg.bits = 2  # validated replacement of the wrapped (frozen) config
    assert cfg.quantplug_config == RtnConfig(bits=2, group_size=64)
    with pytest.raises(quantplug.ConfigError):
        cfg.group_size = 0
    assert cfg.update(symmetric=False, not_a_field=1) == {"not_a_field": 1}
    assert cfg.quantplug_config.symmetric is False
    import copy
    import pickle

    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    assert to_transformers(RTN).quantplug_config is RTN
    assert to_transformers({"quant_method": "rtn", "bits": 2}).bits == 2


def test_bad_config_through_from_pretrained_is_a_config_error(fp_dir):
    register_with_transformers()
    with pytest.raises(quantplug.ConfigError, match="bits=3"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config={"quant_method": "rtn", "bits": 3})


# -- a third-party-style backend registered in the test -------------------------------------------


@pytest.mark.parametrize("renamed", [False, True], ids=["state-dict-layout", "own-layout"])
def test_third_party_backend_loads_through_from_pretrained(fp_dir, ids, tmp_path, renamed):
    register_with_transformers()  # whatever was installed
    name = unique()
    backend = make_int8_backend(name, renamed=renamed)
    quantplug.register_backend(backend)
    assert name not in hf_auto.AUTO_QUANTIZER_MAPPING
    assert register_with_transformers() == [name]
    config = backend.config()

    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)
    assert all(type(model.get_submodule(n)) is Int8Linear for n in linear_names(model))
    expected = logits(model, ids)
    assert torch.equal(expected, logits(quantplug_reference(fp_dir, config), ids))

    model.save_pretrained(tmp_path / "hf")
    keys = checkpoint_keys(tmp_path / "hf")
    if renamed:  # the backend's module_tensors layout, as quantplug.save writes it
        assert (
            keys["model.layers.0.mlp.up_proj.codes"] == "I8"
            and "model.layers.0.mlp.up_proj.weight" not in keys
        )
    else:
        assert keys["model.layers.0.mlp.up_proj.weight"] == "I8"
    assert (
        json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"] == config.to_dict()
    )
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(again.model.layers[0].mlp.up_proj) is Int8Linear
    assert torch.equal(logits(again, ids), expected)
    assert torch.equal(logits(quantplug.load(tmp_path / "hf", progress=False), ids), expected)

    quantplug.save(quantplug_reference(fp_dir, config), tmp_path / "qp")
    assert checkpoint_keys(tmp_path / "qp") == keys
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "qp"), ids), expected)


def test_backends_registered_later_are_registered_by_calling_again():
    register_with_transformers()
    assert register_with_transformers() == []  # nothing new: harmless
    mapped = dict(hf_auto.AUTO_QUANTIZER_MAPPING)
    late = unique("late.int8")
    quantplug.register_backend(make_int8_backend(late))
    assert register_with_transformers() == [late]
    assert register_with_transformers() == []
    assert {k: v for k, v in hf_auto.AUTO_QUANTIZER_MAPPING.items() if k != late} == mapped
    cls_name = hf_auto.AUTO_QUANTIZER_MAPPING[late].__name__
    assert cls_name.startswith("LateInt8") and cls_name.endswith("QuantplugHfQuantizer")


def test_concurrent_registration_registers_once():
    name = unique()
    quantplug.register_backend(make_int8_backend(name))
    results: list[list[str]] = []
    barrier = threading.Barrier(8)

    def work():
        barrier.wait()
        results.append(register_with_transformers())

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(n for r in results for n in r if n == name) == [name]


def test_methods_transformers_knows_keep_transformers_path(rtn_only):
    theirs = {m: hf_auto.AUTO_QUANTIZER_MAPPING.get(m) for m in ("hqq", "torchao")}
    for method in ("hqq", "torchao", "bitsandbytes"):  # bitsandbytes: Transformers' name, not a mapping key
        quantplug.register_backend(make_int8_backend(method))
    added = register_with_transformers()
    assert not {"hqq", "torchao", "bitsandbytes"} & set(added)
    assert {m: hf_auto.AUTO_QUANTIZER_MAPPING.get(m) for m in theirs} == theirs
    assert "bitsandbytes" not in hf_auto.AUTO_QUANTIZER_MAPPING
    assert not issubclass(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["hqq"], QuantplugHfConfig)
    with pytest.raises(quantplug.ConfigError, match="Transformers implements"):
        to_transformers(quantplug.get_backend("hqq").config())


def test_unavailable_backend_says_what_to_install(fp_dir):
    name = unique()
    quantplug.register_backend(make_int8_backend(name, requires=("quantplug-no-such-library>=1",)))
    register_with_transformers()
    with pytest.raises(quantplug.BackendUnavailableError, match="pip install"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=quantplug.get_backend(name).config())


def test_capabilities_drive_serializable_trainable_and_calibration(fp_dir, tmp_path):
    frozen, calib = unique(), unique()
    quantplug.register_backend(make_int8_backend(frozen, serializable=False, trainable=True))
    quantplug.register_backend(make_int8_backend(calib, needs_calibration=True))
    register_with_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=quantplug.get_backend(frozen).config()
    )
    assert model.hf_quantizer.is_trainable and not model.hf_quantizer.is_serializable()
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "x")
    with pytest.raises(quantplug.ConfigError, match="calibration"):
        AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=quantplug.get_backend(calib).config()
        )


def test_unknown_method_is_refused_by_to_transformers():
    with pytest.raises(quantplug.UnknownMethodError):
        to_transformers({"quant_method": "no-such-method"})


# -- a fresh process ------------------------------------------------------------------------------

CHILD = """
import json, sys
import quantplug
light = "torch" not in sys.modules and "transformers" not in sys.modules
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils import logging
logging.disable_progress_bar()
expected = load_file(sys.argv[1])
dirs = json.loads(sys.argv[2])
out = {"light": light, "rtn_before": "rtn" in AUTO_QUANTIZER_MAPPING}

def diff(model, key):
    import torch
    with torch.no_grad():
        return (model(expected["ids"]).logits - expected[key]).abs().max().item()

# quantplug.load with Transformers imported registers the bridge by itself
out["load"] = diff(quantplug.load(dirs["qp"], progress=False), "rtn")
out["rtn_after_load"] = "rtn" in AUTO_QUANTIZER_MAPPING
out["hf_saved"] = diff(AutoModelForCausalLM.from_pretrained(dirs["hf"]), "rtn")
out["qp_saved"] = diff(AutoModelForCausalLM.from_pretrained(dirs["qp"]), "rtn")

# a third-party backend registered programmatically, then the bridge called again
import test_transformers_bridge as t
from quantplug.integrations.transformers import register_with_transformers
quantplug.register_backend(t.make_int8_backend(dirs["tp_name"], renamed=True))
out["registered"] = register_with_transformers()
out["tp_saved"] = diff(AutoModelForCausalLM.from_pretrained(dirs["tp"]), "tp")
print(json.dumps(out))
"""


def child_env() -> dict[str, str]:
    """This environment without QUANTPLUG_* variables, offline, with this folder importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTPLUG_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    env.update(PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def test_fresh_process_loads_saved_checkpoints(fp_dir, ids, tmp_path):
    register_with_transformers()
    rtn = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=RTN)
    rtn.save_pretrained(tmp_path / "hf")
    quantplug.save(quantplug_reference(fp_dir, RTN), tmp_path / "qp")
    tp_name = unique()
    tp_backend = make_int8_backend(tp_name, renamed=True)
    quantplug.register_backend(tp_backend)
    register_with_transformers()
    tp = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=tp_backend.config())
    tp.save_pretrained(tmp_path / "tp")
    save_file({"ids": ids, "rtn": logits(rtn, ids), "tp": logits(tp, ids)}, tmp_path / "expected.safetensors")
    dirs = {
        "hf": str(tmp_path / "hf"),
        "qp": str(tmp_path / "qp"),
        "tp": str(tmp_path / "tp"),
        "tp_name": tp_name,
    }

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD),
            str(tmp_path / "expected.safetensors"),
            json.dumps(dirs),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "light": True,
        "rtn_before": False,
        "load": 0.0,
        "rtn_after_load": True,
        "hf_saved": 0.0,
        "qp_saved": 0.0,
        "registered": [tp_name],
        "tp_saved": 0.0,
    }
