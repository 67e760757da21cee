"""Config fuzz: generated config dicts for every installed backend, built from its config class's
dataclass fields -- values of the right and wrong types, out of range, NaN and infinities, unknown
keys, a missing, wrong or non-string ``quant_method``, junk nested inside dict and list values.

Each dict either builds a valid config -- which then round-trips through ``to_dict``/``from_dict``,
``to_json``/``from_json`` and the dispatcher to an equal config -- or raises ``quantplug.ConfigError``
(``UnknownMethodError`` too through the dispatcher, for a method nobody owns). Any other exception
type is a bug. Examples per backend: 300 in CI, 10,000 in the long run (QUANTPLUG_FAULTS_LONG=1).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import types
import typing
from collections import Counter
from typing import Any, Literal, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantplug
from quantplug import ConfigError, UnknownMethodError

from ._support import LONG, installed_methods, record, size

EXAMPLES = size(300, 10_000)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-3, 300),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["", "none", "4", "int8", "float32", "nf4", "lm_head", "default", "_type", "_data"]),
)
junk = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=6), _scalars), inner, max_size=3),
    ),
    max_leaves=8,
)
_JUNK_LEAVES = [
    None,
    0,
    -1,
    1,
    4,
    2**40,
    1.5,
    math.nan,
    math.inf,
    True,
    "",
    "x",
    "int4",
    [],
    {},
    [1],
    {"a": 1},
]


def from_type(tp: Any) -> st.SearchStrategy:
    """Values of annotation ``tp`` in JSON form (a tuple is a list)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return junk
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (Union, types.UnionType):
        return st.one_of([from_type(a) for a in args])
    if origin is tuple:
        return st.lists(from_type(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(st.text(max_size=6), junk, max_size=3)
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(
            st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 256]), st.integers(-3, 300), st.integers()
        )
    if tp is float:
        return st.one_of(st.floats(), st.floats(0, 20))
    if tp is str:
        return st.text(max_size=10)
    return junk


def _mutate(rng: random.Random, value: Any) -> Any:
    """``value`` (a JSON structure) with one to three random changes somewhere inside it."""
    value = copy.deepcopy(value)
    for _ in range(rng.randrange(1, 4)):
        node, path = value, []
        while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append((node, key))
            node = node[key]
        if not path:
            return rng.choice(_JUNK_LEAVES)
        parent, key = path[-1]
        action = rng.choice(["replace", "delete", "add"])
        if action == "replace":
            parent[key] = copy.deepcopy(rng.choice(_JUNK_LEAVES))
        elif action == "delete":
            parent.pop(key)
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "_type", "_data", "_version", "x"])] = copy.deepcopy(
                rng.choice(_JUNK_LEAVES)
            )
        else:
            parent.append(copy.deepcopy(rng.choice(_JUNK_LEAVES)))
    return value


def field_values(cls: type, f: dataclasses.Field, default_dict: dict) -> st.SearchStrategy:
    tp = typing.get_type_hints(cls)[f.name]
    options = [from_type(tp), from_type(tp), junk]
    if f.name in default_dict:
        default = default_dict[f.name]
        options.append(st.just(default))
        if isinstance(default, (dict, list)) and default:  # nested junk inside a structured value
            options.append(st.builds(_mutate, st.randoms(use_true_random=False), st.just(default)))
    return st.one_of(options)


def config_dicts(cls: type) -> st.SearchStrategy:
    try:
        default_dict = cls().to_dict()
    except ConfigError:  # a class whose defaults alone are not a valid config
        default_dict = {}
    fields = {f.name: field_values(cls, f, default_dict) for f in dataclasses.fields(cls)}
    # valid starting points (the defaults, for_bits), some of whose fields are then overridden:
    # without them a backend whose fields must agree (bitsandbytes) is almost never built
    valid = [default_dict] if default_dict else []
    for bits in (2, 3, 4, 8):
        with contextlib.suppress(ConfigError):
            valid.append(cls.for_bits(bits).to_dict())
    body = st.fixed_dictionaries({}, optional=fields)
    if valid:
        overrides = st.fixed_dictionaries({}, optional={k: v for k, v in list(fields.items())[::2]})
        body = st.one_of(
            body,
            st.builds(lambda v, o: {**v, **o}, st.sampled_from(valid), overrides),
            st.sampled_from(valid),
        )
    absent = object()
    method = st.one_of(
        st.just(cls.quant_method),
        st.just(cls.quant_method),
        st.just(absent),
        st.sampled_from([m for m in installed_methods() if m != cls.quant_method] + ["gptq", "", "RTN "]),
        junk,
    )
    unknown = st.one_of(
        st.just({}),
        st.just({}),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-2, 2), st.none()), junk, max_size=2),
    )

    def build(b, m, u):
        out = dict(b)
        if m is not absent:
            out["quant_method"] = m
        for k, v in u.items():
            out.setdefault(k, v)
        return out

    return st.builds(build, body, method, unknown)


def _round_trips(cls: type, c: quantplug.QuantConfig) -> None:
    assert type(c) is cls
    d = c.to_dict()
    assert d["quant_method"] == cls.quant_method
    text = c.to_json()
    assert json.loads(text) == d or "NaN" in text  # NaN != NaN; the equality below still holds
    assert cls.from_dict(d) == c, (d, cls.from_dict(d))  # the same NaN object: equal by identity
    again = cls.from_json(text)  # a new NaN float is never equal to the old: compare the JSON then
    assert again == c or ("NaN" in text and again.to_json() == text), (text, again)
    assert quantplug.config_from_dict(d) == c


@pytest.mark.parametrize("method", installed_methods())
def test_generated_config_dicts_build_or_raise_config_error(method):
    cls = quantplug.get_backend(method).config
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not LONG,
        suppress_health_check=list(HealthCheck),
    )
    @given(config_dicts(cls))
    def check(data):
        snapshot = repr(data)
        try:
            c = cls.from_dict(data)
        except ConfigError as err:
            assert str(err), "a ConfigError without a message"
            outcomes["rejected"] += 1
        else:
            outcomes["built"] += 1
            _round_trips(cls, c)
        assert repr(data) == snapshot, "from_dict changed its input"

        # the dispatcher: the same dict, routed by its quant_method
        try:
            d = quantplug.config_from_dict(data)
        except (ConfigError, UnknownMethodError) as err:
            assert str(err)
            outcomes["dispatch-rejected"] += 1
        else:
            outcomes["dispatch-built"] += 1
            assert d.quant_method == data["quant_method"]
        # the constructor, given only the class's own keys
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            cls(**kwargs)
        except ConfigError:
            outcomes["init-rejected"] += 1
        else:
            outcomes["init-built"] += 1

    check()
    record("config-fuzz", backend=method, examples_run=outcomes["built"] + outcomes["rejected"], **outcomes)
    assert outcomes["built"] >= EXAMPLES // 50, outcomes  # the generator reaches valid configs
    assert outcomes["rejected"] >= EXAMPLES // 50, outcomes


@pytest.mark.parametrize("method", installed_methods())
def test_for_bits_builds_or_raises_config_error(method):
    cls = quantplug.get_backend(method).config

    @settings(max_examples=size(50, 1000), deadline=None, database=None, derandomize=not LONG)
    @given(
        st.one_of(
            st.integers(-2, 17), st.integers(), st.booleans(), st.floats(), st.text(max_size=3), st.none()
        )
    )
    def check(bits):
        try:
            c = cls.for_bits(bits)
        except ConfigError:
            return
        _round_trips(cls, c)

    check()


def test_a_validate_that_crashes_on_an_unforeseen_value_is_a_config_error():
    """Found by the fuzz above (torchao: a list as quant_type's ``_type`` made its validate() raise
    TypeError). The core turns any such crash into a ConfigError naming the config and the cause."""

    @dataclasses.dataclass(frozen=True)
    class LookupConfig(quantplug.QuantConfig):
        quant_method = "test-lookup"
        kind: Any = "a"

        def validate(self) -> None:
            if self.kind not in {"a": 1, "b": 2}:  # a list or dict here raises TypeError
                raise self.invalid("kind", "'a' or 'b'")

    assert LookupConfig(kind="b").kind == "b"
    with pytest.raises(ConfigError, match="kind"):
        LookupConfig(kind="c")
    with pytest.raises(
        ConfigError, match=r"LookupConfig: these values are invalid \(TypeError.*unhashable"
    ) as err:
        LookupConfig.from_dict({"kind": ["a"]})
    assert isinstance(err.value.__cause__, TypeError)


def test_a_dict_field_needs_string_keys():
    """Found by the fuzz above (hqq: dynamic_config={False: {}} built, and came back from config.json
    as {"false": {}}, a different config). A dict field is a JSON object: string keys, all the way down."""

    @dataclasses.dataclass(frozen=True)
    class DictConfig(quantplug.QuantConfig):
        quant_method = "test-dict"
        table: dict[str, Any] | None = None

    assert DictConfig(table={"a": {"b": [1, {"c": 2}]}}).table == {"a": {"b": [1, {"c": 2}]}}
    for bad in ({False: {}}, {1: "x"}, {"a": {None: 1}}, {"a": [{2: 3}]}):
        with pytest.raises(ConfigError, match="table=.*string keys"):
            DictConfig.from_dict({"table": bad})
