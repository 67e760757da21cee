"""QuantConfig: validation on construction, ConfigError, (de)serialization, immutability."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantplug
from quantplug import ConfigError, QuantConfig
from quantplug_rtn import RtnConfig


@dataclasses.dataclass(frozen=True)
class DemoConfig(QuantConfig):
    """Exercises every annotation kind the validator understands."""

    quant_method = "demo"

    bits: Literal[4, 8] = 8
    ratio: float = 0.5
    label: str = "x"
    layers: tuple[int, ...] = ()
    mode: Literal["fast", "exact"] | None = None
    flag: Literal[0, 1] = 0
    threshold: float | None = None


@dataclasses.dataclass(frozen=True)
class RangeConfig(QuantConfig):
    """A cross-field rule in validate()."""

    quant_method = "range"

    lo: int = 0
    hi: int = 10

    def validate(self) -> None:
        if self.hi < self.lo:
            raise self.invalid("hi", f"an integer >= lo ({self.lo})", why="hi must not be below lo")


RTN_KEYS = ("bits", "group_size", "symmetric", "kernel", "dense_from", "modules_to_not_convert")


# -- construction and validation ------------------------------------------------------------------


def test_defaults_build_and_quant_method_is_a_class_attribute():
    c = RtnConfig()
    assert (c.bits, c.group_size, c.symmetric, c.modules_to_not_convert) == (4, 128, True, None)
    assert c.quant_method == RtnConfig.quant_method == "rtn"
    assert "quant_method" not in {f.name for f in dataclasses.fields(c)}


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed_fragment"),
    [
        ({"bits": 3}, "bits", "one of 2, 4, 8"),
        ({"bits": "4"}, "bits", "one of 2, 4, 8"),
        ({"bits": 4.0}, "bits", "one of 2, 4, 8"),  # Literal values are matched by type too
        ({"group_size": "128"}, "group_size", "an integer"),
        ({"group_size": 1.5}, "group_size", "an integer"),
        ({"group_size": None}, "group_size", "an integer"),
        ({"symmetric": 1}, "symmetric", "true or false"),
        ({"symmetric": "yes"}, "symmetric", "true or false"),
        ({"modules_to_not_convert": "lm_head"}, "modules_to_not_convert", "list"),  # a str is not a list
        ({"modules_to_not_convert": ["lm_head", 3]}, "modules_to_not_convert", "list"),
        ({"group_size": 0}, "group_size", "positive integer"),  # RtnConfig.validate()
        ({"group_size": -2}, "group_size", "positive integer"),
    ],
)
def test_rtn_invalid_values_raise_config_error_naming_field_value_and_allowed(
    kwargs, field, allowed_fragment
):
    (value,) = kwargs.values()
    with pytest.raises(ConfigError) as info:
        RtnConfig(**kwargs)
    err = info.value
    assert err.field == field
    assert err.value == value and type(err.value) is type(value)
    assert allowed_fragment in str(err.allowed)
    msg = str(err)
    assert "RtnConfig" in msg
    assert f"{field}={value!r}" in msg
    assert allowed_fragment in msg


def test_config_error_is_a_value_error_and_a_quantplug_error():
    with pytest.raises(ValueError):
        RtnConfig(bits=5)
    with pytest.raises(quantplug.QuantplugError):
        RtnConfig(bits=5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"group_size": True}, "group_size"),  # bool is an int subclass: must not pass for an int
        ({"group_size": False}, "group_size"),
        ({"flag": True}, "flag"),  # True == 1, but a Literal[0, 1] field wants the integer
        ({"flag": False}, "flag"),
        ({"ratio": True}, "ratio"),  # nor for a float
        ({"layers": [1, True]}, "layers"),
        ({"threshold": False}, "threshold"),
    ],
)
def test_bool_is_rejected_where_an_int_or_float_is_expected(kwargs, field):
    cls = RtnConfig if field == "group_size" else DemoConfig
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.field == field


def test_literal_ints_accept_the_exact_int():
    assert DemoConfig(flag=1).flag == 1
    assert RtnConfig(bits=8).bits == 8


def test_int_is_coerced_to_float():
    c = DemoConfig(ratio=1, threshold=3)
    assert c.ratio == 1.0 and type(c.ratio) is float
    assert c.threshold == 3.0 and type(c.threshold) is float
    assert DemoConfig(threshold=None).threshold is None


def test_float_is_not_coerced_to_int():
    with pytest.raises(ConfigError) as info:
        RtnConfig(group_size=64.0)
    assert info.value.field == "group_size"


def test_lists_become_tuples_and_elements_are_checked():
    c = RtnConfig(modules_to_not_convert=["lm_head", "model.embed"])
    assert c.modules_to_not_convert == ("lm_head", "model.embed")
    assert type(c.modules_to_not_convert) is tuple
    d = DemoConfig(layers=[1, 2, 3])
    assert d.layers == (1, 2, 3) and type(d.layers) is tuple
    with pytest.raises(ConfigError) as info:
        DemoConfig(layers=[1, "2"])
    assert info.value.field == "layers"
    assert "list" in str(info.value.allowed) and "integer" in str(info.value.allowed)


def test_optional_literal():
    assert DemoConfig(mode="fast").mode == "fast"
    assert DemoConfig(mode=None).mode is None
    with pytest.raises(ConfigError) as info:
        DemoConfig(mode="slow")
    err = info.value
    assert (err.field, err.value) == ("mode", "slow")
    assert "'fast'" in err.allowed and "'exact'" in err.allowed and "null" in err.allowed


def test_cross_field_validate_raises_config_error_with_reason():
    assert RangeConfig(lo=1, hi=1).hi == 1
    with pytest.raises(ConfigError) as info:
        RangeConfig(lo=5, hi=2)
    err = info.value
    assert (err.field, err.value) == ("hi", 2)
    assert "hi must not be below lo" in str(err)
    assert "an integer >= lo (5)" in str(err)


def test_a_subclass_without_quant_method_cannot_be_instantiated():
    @dataclasses.dataclass(frozen=True)
    class NoMethod(QuantConfig):
        pass

    with pytest.raises(TypeError, match="quant_method"):
        NoMethod()


def test_unknown_keyword_raises_config_error_for_subclasses_of_subclasses_too():
    @dataclasses.dataclass(frozen=True)
    class Child(DemoConfig):
        extra: int = 1

    @dataclasses.dataclass(frozen=True)
    class Grandchild(Child):
        more: int = 2

    for cls in (DemoConfig, Child, Grandchild):
        with pytest.raises(ConfigError) as info:
            cls(bitz=4)
        err = info.value
        assert (err.field, err.value) == ("bitz", 4)
        assert set(err.allowed) == {f.name for f in dataclasses.fields(cls)}
        assert f"{cls.__name__}: unknown key(s) 'bitz'; allowed keys: " in str(err)
    assert Grandchild(bits=4, extra=3, more=5).more == 5  # known keys and positional order still work
    with pytest.raises(ConfigError, match="positional values given, but it takes at most"):
        RangeConfig(1, 2, 3, 4)


def test_init_var_and_hand_written_init_keywords_are_not_refused():
    @dataclasses.dataclass(frozen=True)
    class WithInitVar(QuantConfig):
        quant_method = "initvar"
        scale: dataclasses.InitVar[int] = 1

        def __post_init__(self, scale):
            super().__post_init__()

    assert WithInitVar(scale=3).to_dict() == {"quant_method": "initvar", "modules_to_not_convert": None}


def test_a_bare_string_for_a_list_of_strings_says_give_a_list():
    with pytest.raises(ConfigError) as info:
        DemoConfig(modules_to_not_convert="lm_head")
    assert str(info.value) == (
        "DemoConfig: modules_to_not_convert='lm_head' is invalid (a single string; give a list: ['lm_head']); "
        "allowed: a list of strings (module names), or null."
    )
    with pytest.raises(ConfigError, match=r"allowed: a list of integers\.$"):
        DemoConfig(layers="1")


# -- from_dict / to_dict / JSON ----------------------------------------------------------------------


def test_from_dict_unknown_keys_raise_and_list_allowed_keys():
    with pytest.raises(ConfigError) as info:
        RtnConfig.from_dict({"quant_method": "rtn", "bits": 4, "bitz": 4, "zz_extra": 1})
    err = info.value
    assert err.field == "bitz"
    msg = str(err)
    assert "'bitz'" in msg and "'zz_extra'" in msg
    for key in ("quant_method", *RTN_KEYS):
        assert key in msg
    assert set(err.allowed) == set(RTN_KEYS)


def test_from_dict_with_mismatched_quant_method():
    with pytest.raises(ConfigError) as info:
        RtnConfig.from_dict({"quant_method": "hqq", "bits": 4})
    err = info.value
    assert (err.field, err.value, err.allowed) == ("quant_method", "hqq", "rtn")
    assert "'hqq'" in str(err) and "'rtn'" in str(err)
    assert "AutoQuantizer.from_config" in str(err)


def test_from_dict_without_quant_method_uses_the_class():
    assert RtnConfig.from_dict({"bits": 8}) == RtnConfig(bits=8)


def test_from_dict_rejects_non_dicts():
    for bad in ([("bits", 4)], "bits=4", None, 4):
        with pytest.raises(ConfigError):
            RtnConfig.from_dict(bad)


def test_from_dict_validates_values():
    with pytest.raises(ConfigError) as info:
        RtnConfig.from_dict({"quant_method": "rtn", "bits": 16})
    assert info.value.field == "bits"


def test_from_dict_rejects_non_string_keys_with_config_error():
    with pytest.raises(ConfigError):
        RtnConfig.from_dict({1: 2})
    with pytest.raises(ConfigError):  # mixed key types must not crash the unknown-key report
        RtnConfig.from_dict({1: 2, "bits": 4, "other": 3})


def test_to_dict_is_json_ready_and_starts_with_quant_method():
    c = RtnConfig(bits=2, modules_to_not_convert=("lm_head",))
    d = c.to_dict()
    assert next(iter(d)) == "quant_method"
    assert d == {
        "quant_method": "rtn",
        "modules_to_not_convert": ["lm_head"],
        "bits": 2,
        "group_size": 128,
        "symmetric": True,
        "kernel": "auto",
        "dense_from": None,
    }
    assert json.loads(c.to_json()) == d
    assert json.loads(c.to_json(indent=None)) == d


ROUND_TRIP = [
    RtnConfig(),
    RtnConfig(bits=8, group_size=-1, symmetric=False),
    RtnConfig(bits=2, group_size=32, modules_to_not_convert=("lm_head", "model.layers.0.mlp")),
    RtnConfig(modules_to_not_convert=()),
    DemoConfig(),
    DemoConfig(bits=4, ratio=0.125, label="ü-ñ", layers=(3, 1, 2), mode="exact", flag=1, threshold=1e-3),
    RangeConfig(lo=-3, hi=7),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=lambda c: repr(c))
def test_round_trip(config):
    cls = type(config)
    assert cls.from_dict(config.to_dict()) == config
    assert cls.from_json(config.to_json()) == config
    assert cls.from_json(config.to_json(indent=None)) == config
    again = cls.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)


def test_round_trip_through_the_dispatcher():
    c = RtnConfig(bits=8, group_size=64, symmetric=False)
    back = quantplug.config_from_dict(json.loads(c.to_json()))
    assert type(back) is RtnConfig and back == c


def test_from_json_rejects_invalid_json():
    with pytest.raises(ConfigError) as info:
        RtnConfig.from_json("{bits: 4")
    assert "not valid JSON" in str(info.value)
    with pytest.raises(ConfigError):
        RtnConfig.from_json("[4]")


def test_configs_of_different_classes_are_not_equal():
    @dataclasses.dataclass(frozen=True)
    class OtherRtn(RtnConfig):
        pass

    assert OtherRtn() != RtnConfig()
    assert RtnConfig(bits=4) != RtnConfig(bits=8)


# -- immutability -------------------------------------------------------------------------------------


def test_configs_are_frozen():
    c = RtnConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.bits = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.modules_to_not_convert = ("x",)  # type: ignore[misc]
    assert c.bits == 4
    assert {RtnConfig(): 1}[RtnConfig()] == 1  # hashable, usable as a key


def test_dataclasses_replace_revalidates():
    c = RtnConfig()
    assert dataclasses.replace(c, bits=8).bits == 8
    assert dataclasses.replace(c, modules_to_not_convert=["a"]).modules_to_not_convert == ("a",)
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(c, bits=3)
    assert info.value.field == "bits"
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(c, group_size=0)
    assert info.value.field == "group_size"
    with pytest.raises(ConfigError):
        dataclasses.replace(RangeConfig(lo=0, hi=1), lo=2)
    assert c == RtnConfig()  # the original is untouched


# -- property: any dict either builds or raises ConfigError ------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16, 64, 128]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["rtn", "hqq", "lm_head", "4", ""]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=3), inner, max_size=2),
    ),
    max_leaves=6,
)
_keys = st.one_of(
    st.sampled_from(["quant_method", *RTN_KEYS]),
    st.text(max_size=8),
    st.integers(-3, 3),
    st.none(),
)
_near_valid = st.fixed_dictionaries(
    {},
    optional={
        "quant_method": st.one_of(st.just("rtn"), _values),
        "bits": st.one_of(st.sampled_from([2, 4, 8]), _values),
        "group_size": st.one_of(st.sampled_from([-1, 1, 32, 128]), _values),
        "symmetric": st.one_of(st.booleans(), _values),
        "modules_to_not_convert": st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=3), _values),
    },
)
_rtn_dicts = st.one_of(
    _near_valid,
    st.builds(lambda a, b: {**a, **b}, _near_valid, st.dictionaries(_keys, _values, max_size=2)),
    st.dictionaries(_keys, _values, max_size=5),
)


def test_random_dicts_build_an_rtn_config_or_raise_config_error():
    outcomes = {"built": 0, "rejected": 0}

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_rtn_dicts)
    def check(data):
        snapshot = repr(data)
        try:
            c = RtnConfig.from_dict(data)
        except ConfigError as err:
            outcomes["rejected"] += 1
            assert str(err)
            return
        outcomes["built"] += 1
        assert repr(data) == snapshot  # from_dict must not mutate its input
        assert c.bits in (2, 4, 8) and type(c.bits) is int
        assert type(c.group_size) is int and (c.group_size == -1 or c.group_size >= 1)
        assert type(c.symmetric) is bool
        assert c.modules_to_not_convert is None or all(type(m) is str for m in c.modules_to_not_convert)
        assert RtnConfig.from_json(c.to_json()) == c

    check()
    assert outcomes["built"] > 20, outcomes
    assert outcomes["rejected"] > 20, outcomes


def test_random_dicts_through_the_dispatcher_raise_only_quantplug_errors(rtn_only):
    @settings(max_examples=150, deadline=None, database=None)
    @given(_rtn_dicts)
    def check(data):
        try:
            c = quantplug.config_from_dict(data)
        except (ConfigError, quantplug.UnknownMethodError):
            return
        assert type(c) is RtnConfig

    check()


def test_nan_and_inf_are_not_valid_bits_or_group_size():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError):
            RtnConfig(bits=bad)
        with pytest.raises(ConfigError):
            RtnConfig(group_size=bad)
