"""Configs read from a checkpoint keep the keys other tools add (``QuantConfig.from_checkpoint``:
kept in ``extra``, logged, written back on save, as Transformers does); configs a user writes stay
strict. One mechanism for every backend: the reference plugin ``rtn`` and hand-made config classes
show it here; the plugins' tests run it on the checkpoints their tools write."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors import safe_open

import quantplug
from quantplug import ConfigError, QuantConfig
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug.walk import quantized_info
from quantplug_rtn import RtnConfig

FOREIGN = {"provider": "auto-round", "iters": 200, "autoround_version": "0.16.1", "meta": {"a": [1, 2]}}


@dataclasses.dataclass(frozen=True)
class StrictAboutFloatsConfig(QuantConfig):
    """A backend that refuses a foreign key which would change its weights, and reads another
    tool's spelling in its own from_dict before the base class."""

    quant_method = "strict-floats"

    bits: int = 4

    def validate(self) -> None:
        if self.extra.get("data_type", "int") != "int":
            raise ConfigError(
                f"data_type={self.extra['data_type']!r}: only integer weights", field="data_type"
            )

    @classmethod
    def from_dict(cls, data):
        if isinstance(data, dict) and "wbits" in data:
            data = {**data, "bits": data["wbits"]}
            del data["wbits"]
        return super().from_dict(data)


@dataclasses.dataclass(frozen=True)
class BuildsAnotherConfig(QuantConfig):
    """validate() builds a config of its own: that one must not take the kept keys."""

    quant_method = "builds-another"

    bits: int = 4

    def validate(self) -> None:
        object.__setattr__(self, "_inner", RtnConfig(bits=self.bits))


def test_a_users_dict_and_keywords_stay_strict():
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) 'autoround_version', 'iters', 'meta', 'provider'"
    ):
        RtnConfig.from_dict({"bits": 4, **FOREIGN})
    with pytest.raises(ConfigError, match="unknown key"):
        quantplug.config_from_dict({"quant_method": "rtn", "bits": 4, **FOREIGN})
    with pytest.raises(ConfigError, match="unknown key"):
        RtnConfig(bits=4, iters=3)
    with pytest.raises(ConfigError, match="unknown key"):
        quantplug.quantize(tiny_llama(), {"quant_method": "rtn", "bits": 4, "iters": 3}, progress=False)


def test_from_checkpoint_keeps_unknown_keys_logs_them_and_writes_them_back(caplog):
    with caplog.at_level(logging.INFO, logger="quantplug"):
        config = RtnConfig.from_checkpoint({"quant_method": "rtn", "bits": 8, **FOREIGN})
    assert config.bits == 8 and dict(config.extra) == FOREIGN
    kept = [r for r in caplog.records if r.levelno == logging.INFO and "kept key(s)" in r.getMessage()]
    assert len(kept) == 1 and all(repr(k) in kept[0].getMessage() for k in FOREIGN)
    out = config.to_dict()
    assert out == {**RtnConfig(bits=8).to_dict(), **FOREIGN}
    assert list(out)[: len(RtnConfig(bits=8).to_dict())] == list(RtnConfig(bits=8).to_dict())  # fields first
    assert json.loads(config.to_json()) == out
    # not part of equality or hash; a second reading gives them back; extra cannot be changed
    assert config == RtnConfig(bits=8) and hash(config) == hash(RtnConfig(bits=8))
    again = RtnConfig.from_checkpoint(out)
    assert again == config and dict(again.extra) == FOREIGN
    with pytest.raises(TypeError):
        config.extra["iters"] = 1  # type: ignore[index]
    out["meta"]["a"].append(3)  # to_dict hands out copies
    assert config.extra["meta"] == {"a": [1, 2]}
    assert RtnConfig(bits=8).extra == {} and quantplug.config_from_dict({"quant_method": "rtn"}).extra == {}


def test_from_checkpoint_still_validates_every_known_key():
    with pytest.raises(ConfigError) as info:
        RtnConfig.from_checkpoint({"quant_method": "rtn", "bits": 5, **FOREIGN})
    assert info.value.field == "bits"
    with pytest.raises(ConfigError, match="does not match"):
        RtnConfig.from_checkpoint({"quant_method": "gptq", "bits": 4})
    with pytest.raises(ConfigError, match="unknown key"):  # JSON has no such keys: still refused
        RtnConfig.from_checkpoint({"bits": 4, 3: "x"})


def test_the_dispatcher_reads_a_checkpoint_config_with_from_checkpoint_true():
    data = {"quant_method": "rtn", "bits": 4, **FOREIGN}
    config = quantplug.config_from_dict(data, from_checkpoint=True)
    assert isinstance(config, RtnConfig) and dict(config.extra) == FOREIGN


def test_a_backend_sees_kept_keys_in_validate_and_its_own_from_dict_gets_the_mechanism():
    config = StrictAboutFloatsConfig.from_checkpoint({"wbits": 8, "data_type": "int", "tool": "x"})
    assert config.bits == 8 and dict(config.extra) == {"data_type": "int", "tool": "x"}
    with pytest.raises(ConfigError, match="only integer weights"):
        StrictAboutFloatsConfig.from_checkpoint({"wbits": 8, "data_type": "nv_fp"})
    with pytest.raises(ConfigError, match="unknown key"):
        StrictAboutFloatsConfig.from_dict({"wbits": 8, "tool": "x"})


def test_configs_built_while_validating_do_not_take_the_kept_keys():
    config = BuildsAnotherConfig.from_checkpoint({"bits": 8, "tool": "x"})
    assert dict(config.extra) == {"tool": "x"} and config._inner.extra == {}
    assert BuildsAnotherConfig.from_dict({"bits": 8}).extra == {}  # nothing leaks into the next one


def _with_foreign_keys(folder):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"].update(FOREIGN)
    path.write_text(json.dumps(data))


def test_load_keeps_another_tools_keys_and_save_writes_them_back(tmp_path, caplog):
    model = tiny_llama()
    quantplug.quantize(model, RtnConfig(bits=4, group_size=32), progress=False)
    folder = quantplug.save(model, tmp_path / "q")
    _with_foreign_keys(folder)  # as another tool re-saving it would (the header keeps quantplug's)
    ids = token_ids()
    with caplog.at_level(logging.INFO, logger="quantplug"):
        loaded = quantplug.load(folder, progress=False)
    assert any("kept key(s)" in r.getMessage() for r in caplog.records)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert dict(quantized_info(loaded).config.extra) == FOREIGN
    out = quantplug.save(loaded, tmp_path / "again")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in FOREIGN} == FOREIGN
    with safe_open(out / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["quantization_config"]) == qc  # the header records them too
    assert torch.equal(logits(quantplug.load(out, progress=False), ids), logits(model, ids))


def test_transformers_reads_kept_keys_from_config_json_and_a_users_dict_stays_strict(tmp_path):
    from transformers import AutoModelForCausalLM

    from quantplug.integrations.transformers import register_with_transformers

    register_with_transformers()
    model = tiny_llama()
    quantplug.quantize(model, RtnConfig(bits=4, group_size=32), progress=False)
    folder = quantplug.save(model, tmp_path / "q")
    _with_foreign_keys(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = token_ids()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    loaded.save_pretrained(tmp_path / "resaved")
    qc = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in FOREIGN} == FOREIGN

    fp = tmp_path / "fp"
    tiny_llama().save_pretrained(fp)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'iters'"):
        AutoModelForCausalLM.from_pretrained(fp, quantization_config={"quant_method": "rtn", "iters": 3})
