"""The parts of the plugin contract that let a plugin delegate to the core and to its library:
skip-list aliases matched by the core's one matcher (``QuantConfig.skip_aliases`` /
``skip_rules``, ``quantplug.matching``) and validation that needs the library
(``Quantizer.check_config``). The backends here are third-party style: registered at runtime,
quantizing with the reference plugin's ``RtnQuantizer``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import quantplug
from quantplug.matching import linear_tag, matches, matching_pattern
from quantplug.testing import tiny_llama
from quantplug_rtn import RtnConfig
from quantplug_rtn.quantizer import RtnQuantizer


@dataclasses.dataclass(frozen=True)
class AliasConfig(RtnConfig):
    """rtn settings plus a library-named skip list matched by all three rules."""

    quant_method = "tp-alias"
    skip_aliases = ("skip_modules",)
    skip_rules = ("components", "transformers", "linear_tag")

    skip_modules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PlainConfig(RtnConfig):
    quant_method = "tp-plain"
    skip_aliases = ("skip_modules",)

    skip_modules: tuple[str, ...] = ()


class PickyQuantizer(RtnQuantizer):
    """Its 'library' refuses group_size 32 once imported."""

    def check_config(self) -> None:
        if self.config.group_size == 32:
            raise quantplug.ConfigError("the library refuses group_size=32", field="group_size", value=32)


def register(config: type, quantizer: str = "quantplug_rtn.quantizer:RtnQuantizer") -> None:
    quantplug.register_backend(
        quantplug.Backend(
            name=config.quant_method,
            config=config,
            quantizer=quantizer,
            capabilities=quantplug.Capabilities(bits=(2, 4, 8)),
        )
    )


class Experts(nn.Module):
    """``model.layers.0.experts.<i>.fc``: linear tag ``experts.fc``, which is no run of components."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].experts = nn.ModuleList([nn.Sequential() for _ in range(2)])
        for expert in self.model.layers[0].experts:
            expert.add_module("fc", nn.Linear(32, 32))
        self.model.layers[0].gate = nn.Linear(32, 32)


def test_the_three_rules():
    name = "model.layers.3.self_attn.q_proj"
    assert linear_tag(name) == "self_attn.q_proj"
    assert matches(name, ["self_attn.q_proj"])  # whole dotted components
    assert not matches(name, ["attn.q_proj"])  # a partial component is no match by default ...
    assert matches(name, ["attn.q_proj"], ("transformers",))  # ... but Transformers matches suffixes
    assert (
        matching_pattern(name, ["x", r"model\.layers\.[0-3]"], ("transformers",)) == r"model\.layers\.[0-3]"
    )
    assert not matches(name, [r"model\.layers\.[0-3]"])
    assert matches("model.layers.0.experts.1.fc", ["experts.fc"], ("linear_tag",))
    assert not matches("model.layers.0.experts.1.fc", ["experts.fc"])
    with pytest.raises(ValueError, match="unknown module matching rule"):
        matches(name, ["x"], ("glob",))


def test_an_alias_list_keeps_layers_in_full_precision_by_each_declared_rule():
    register(AliasConfig)
    model = tiny_llama()
    pattern = r"model\.layers\.1\.self_attn\.[qk]_proj"
    config = AliasConfig(bits=4, skip_modules=("mlp.down_proj", pattern))
    report = quantplug.quantize(model, config, progress=False)
    assert report.skipped["model.layers.0.mlp.down_proj"] == "listed in skip_modules"
    assert report.skipped["model.layers.1.self_attn.q_proj"] == (
        f"matches skip_modules pattern {pattern!r} (as Transformers matches it)"
    )
    assert type(model.model.layers[1].self_attn.k_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.v_proj) is not nn.Linear  # the regex left v_proj alone
    # modules_to_not_convert is None: the default skips (the output head) still apply beside the alias
    assert "lm_head" in report.skipped and type(model.lm_head) is nn.Linear

    experts = Experts()
    report = quantplug.quantize(
        experts, AliasConfig(bits=8, group_size=-1, skip_modules=("experts.fc",)), progress=False
    )
    assert set(report.skipped) == {"model.layers.0.experts.0.fc", "model.layers.0.experts.1.fc"}
    assert "by its linear tag" in report.skipped["model.layers.0.experts.0.fc"]
    assert report.converted == ["model.layers.0.gate"]


def test_rules_not_declared_do_not_match():
    register(PlainConfig)  # skip_rules: components only
    model = tiny_llama()
    report = quantplug.quantize(
        model, PlainConfig(bits=4, skip_modules=(r"model\.layers\.1\..*",)), progress=False
    )
    assert not any(name.startswith("model.layers.1.") for name in report.skipped)


@pytest.mark.parametrize(
    "attrs, problem",
    [
        ({"skip_aliases": ("no_such_field",)}, "skip_aliases names 'no_such_field'"),
        ({"skip_rules": ("glob",)}, "skip_rules must be a non-empty subset"),
        ({"skip_rules": ()}, "skip_rules must be a non-empty subset"),
    ],
)
def test_bad_skip_declarations_are_refused_at_registration(attrs, problem):
    config = dataclasses.make_dataclass(
        "BadSkips", [], bases=(RtnConfig,), frozen=True, namespace={"quant_method": "tp-bad-skips", **attrs}
    )
    with pytest.raises(quantplug.PluginError, match=problem):
        register(config)
    assert "tp-bad-skips" not in {b.name for b in quantplug.backends()}
    assert not quantplug.problems()  # a refused register_backend leaves nothing for `doctor` to report


def test_check_config_refuses_before_any_layer_is_touched():
    @dataclasses.dataclass(frozen=True)
    class PickyConfig(RtnConfig):
        quant_method = "tp-picky"

    register(PickyConfig, f"{__name__}:PickyQuantizer")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(quantplug.ConfigError, match="refuses group_size=32") as err:
        quantplug.quantize(model, PickyConfig(bits=4, group_size=32), progress=False)
    assert err.value.field == "group_size"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(quantplug.AutoQuantizer.from_config(PickyConfig(bits=4, group_size=64)), PickyQuantizer)
