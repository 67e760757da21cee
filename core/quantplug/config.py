"""``QuantConfig``: the base of every backend's quantization config.

A config is a frozen dataclass. Its class attribute ``quant_method`` is the dispatch key (the same
string Transformers uses where Transformers knows the method, so ``config.json`` files
interoperate). Construction validates every field against its type annotation (``Literal`` gives
the allowed values) and then calls ``validate()`` for cross-field rules; anything wrong raises
``ConfigError`` naming the field, the value and what is allowed. Unknown keys are an error, never
silently dropped, in a config a user writes (``from_dict``, keyword construction). A config read
from a checkpoint (``from_checkpoint``) keeps the keys other tools add, unread, in ``extra`` and
writes them back on save, as Transformers does.

This module imports nothing heavy: listing backends and validating configs never imports torch.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import json
import logging
import types
import typing
from typing import Any, ClassVar, Literal, Union

from .errors import ConfigError

logger = logging.getLogger(__name__)

_HINTS: dict[type, dict[str, Any]] = {}

#: set while ``from_checkpoint`` runs: ``from_dict`` then keeps unknown keys instead of refusing them
_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "quantplug_from_checkpoint", default=False
)
#: the kept keys on their way from ``from_dict`` to the instance ``__post_init__`` is building
_PENDING_EXTRA: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "quantplug_pending_extra", default=None
)


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        some = " or ".join(_describe(a) for a in args if a is not type(None))
        return some + ", or null" if type(None) in args else some
    if origin is tuple:
        (item, *_) = typing.get_args(tp)
        return f"a list of {_PLURAL.get(item) or _describe(item)}"
    if origin is dict:
        return "a mapping with string keys (a JSON object)"
    if tp is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


_INIT_NAMES: dict[type, tuple[str, ...] | None] = {}


def _init_names(cls: type) -> tuple[str, ...] | None:
    """The keyword arguments ``cls.__init__`` takes (dataclass fields and ``InitVar``s); ``None``
    when it takes ``*args`` or ``**kwargs`` (then it checks its own arguments)."""
    if cls not in _INIT_NAMES:
        import inspect

        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        named = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        hand_written = any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)
        _INIT_NAMES[cls] = None if hand_written else named
    return _INIT_NAMES[cls]


class _Mismatch(Exception):
    pass


def _string_keys(value: Any) -> bool:
    """Every dict inside ``value`` (itself included) has only string keys."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _string_keys(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_string_keys(v) for v in value)
    return True


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to annotation ``tp`` (list -> tuple, int -> float), or raise _Mismatch."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        for allowed in typing.get_args(tp):
            # bool is an int subclass: True must not pass for 1.
            if value == allowed and type(value) is type(allowed):
                return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        return tuple(_coerce(v, args[0]) for v in value)
    if origin is dict:
        # config.json stores it as a JSON object, whose keys are strings: {False: ...} would come
        # back as {"false": ...}, a different config
        if not isinstance(value, dict) or not _string_keys(value):
            raise _Mismatch
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Base class of quantization configs.

    Subclass it as a frozen dataclass, set ``quant_method`` and give every field a type annotation
    and a default. Override ``validate()`` for rules that involve several fields, raising
    ``self.invalid(...)``.
    """

    quant_method: ClassVar[str] = ""

    skip_aliases: ClassVar[tuple[str, ...]] = ()
    """Other fields of this config that list modules to keep in full precision, as
    ``modules_to_not_convert`` does, under a library's own name (e.g. Transformers'
    ``llm_int8_skip_modules``, HQQ's ``skip_modules``). The core matches every list; the plugin
    writes no matcher of its own. Each must be a ``tuple[str, ...]`` (or ``| None``) field."""
    skip_rules: ClassVar[tuple[str, ...]] = ("components",)
    """How skip-list patterns match module names, any of ``quantplug.matching.RULES``:
    ``"components"`` (quantplug's: whole dotted components), ``"transformers"`` (Transformers'
    regex-prefix-or-suffix rule), ``"linear_tag"`` (Transformers' HQQ tags). See ``quantplug.matching``."""

    modules_to_not_convert: tuple[str, ...] | None = None
    """Module names (or name suffixes, matched per dotted component) left in full precision.
    ``None`` means the default: keep the output head (``lm_head``) unquantized."""

    def __new__(cls, *args: Any, **kwargs: Any) -> QuantConfig:
        # the dataclass __init__ would raise a bare TypeError for an unknown keyword; the dict form
        # (from_dict) raises ConfigError, and so must keyword construction, for every subclass
        names = _init_names(cls)
        if names is None:
            return super().__new__(cls)
        unknown = sorted(set(kwargs) - set(names))
        if unknown or len(args) > len(names):
            what = (
                f"unknown key(s) {', '.join(map(repr, unknown))}"
                if unknown
                else f"{len(args)} positional values given, but it takes at most {len(names)}"
            )
            raise ConfigError(
                f"{cls.__name__}: {what}; allowed keys: {', '.join(sorted(names))} (pass them by name).",
                field=unknown[0] if unknown else None,
                value=kwargs[unknown[0]] if unknown else args,
                allowed=sorted(names),
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        cls = type(self)
        if not cls.quant_method:
            raise TypeError(f"{cls.__name__} must set the class attribute quant_method")
        # the keys from_checkpoint kept (before validate(), which may refuse some of them by name)
        pending = _PENDING_EXTRA.get()
        _PENDING_EXTRA.set(None)  # a config that validate() builds does not take them
        object.__setattr__(self, "_extra", pending or {})
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = _hints(cls)[f.name]
            try:
                coerced = _coerce(value, tp)
            except _Mismatch:
                raise self._mismatch(f.name, tp) from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        try:
            self.validate()
        except ConfigError:
            raise
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
            # a value validate() did not foresee (a list where it looks up a name, a huge int) is
            # still a bad config: say so, instead of letting the user see a backend's traceback
            raise ConfigError(
                f"{cls.__name__}: these values are invalid ({type(exc).__name__} while validating them: {exc}): "
                f"{self!r}; see {cls.__name__}'s documentation for what is allowed.",
                value=self,
                allowed=f"see {cls.__name__}",
            ) from exc

    def _mismatch(self, field: str, tp: Any) -> ConfigError:
        allowed = _describe(tp)
        if field == "modules_to_not_convert" or field in self.skip_aliases:
            allowed = allowed.replace("a list of strings", "a list of strings (module names)")
        value = getattr(self, field)
        if isinstance(value, str) and "a list of strings" in allowed:
            return self.invalid(field, allowed, f"a single string; give a list: [{value!r}]")
        return self.invalid(field, allowed)

    def validate(self) -> None:
        """Check rules that involve more than one field. Raise ``self.invalid(...)`` on failure.
        ``self.extra`` is already set here: refuse a kept key that would change the weights."""

    @property
    def extra(self) -> types.MappingProxyType[str, Any]:
        """Keys of a checkpoint's ``quantization_config`` that are not fields of this config, as
        ``from_checkpoint`` kept them (other tools' bookkeeping, e.g. auto-round's ``iters``); empty
        for a config a user built. Read-only; not part of ``==`` or ``hash``; ``to_dict`` writes
        them back. ``dataclasses.replace`` builds a config without them."""
        return types.MappingProxyType(self.__dict__.get("_extra", {}))

    def invalid(self, field: str, allowed: str, why: str = "") -> ConfigError:
        """Build the ConfigError for ``field``: names the config, the field, the value and what is allowed."""
        value = getattr(self, field, None)
        reason = f" ({why})" if why else ""
        return ConfigError(
            f"{type(self).__name__}: {field}={value!r} is invalid{reason}; allowed: {allowed}.",
            field=field,
            value=value,
            allowed=allowed,
        )

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> QuantConfig:
        """A config of this backend that stores weights at ``bits`` bits (used by the CLI's
        ``--bits`` and by ``select``). The default sets a field named ``bits``; backends whose
        configs spell it differently (``nbits``, ``load_in_4bit``, ...) override this."""
        if "bits" not in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(
                f"{cls.__name__} has no generic bit-width setting; give its own keys instead",
                field="bits",
                value=bits,
                allowed=sorted(f.name for f in dataclasses.fields(cls)),
            )
        return cls(bits=bits, **overrides)

    # -- serialization --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that starts with ``quant_method``; tuples become lists; the ``extra``
        keys a checkpoint brought follow the fields."""
        out: dict[str, Any] = {"quant_method": self.quant_method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        for key, value in self.extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Build a config from ``to_dict()`` output or a ``config.json`` ``quantization_config``."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}",
                value=data,
                allowed="a dict",
            )
        data = dict(data)
        method = data.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ConfigError(
                f"{cls.__name__}: quant_method={method!r} does not match this config class "
                f"(expected {cls.quant_method!r}); dispatch with quantplug.AutoQuantizer.from_config instead.",
                field="quant_method",
                value=method,
                allowed=cls.quant_method,
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)  # keys may be non-strings in a hand-made dict
        extra: dict[str, Any] = {}
        if unknown and _FROM_CHECKPOINT.get() and all(isinstance(k, str) for k in unknown):
            extra = {k: data.pop(k) for k in unknown}
            unknown = []
            logger.info(
                "%s: kept key(s) %s of the checkpoint's quantization_config as they are (another tool's; "
                "quantplug does not read them, and writes them back on save)",
                cls.__name__,
                ", ".join(map(repr, extra)),
            )
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: quant_method, {', '.join(sorted(known))}.",
                field=str(unknown[0]),
                value=data[unknown[0]],
                allowed=sorted(known),
            )
        token = _PENDING_EXTRA.set(extra)
        try:
            return cls(**data)
        finally:
            _PENDING_EXTRA.reset(token)

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> QuantConfig:
        """Build a config from a checkpoint's ``quantization_config``: as ``from_dict``, except that
        keys which are not fields of this config are kept in ``extra`` (logged at INFO) instead of
        refused. Other tools add their own bookkeeping to the configs they write (auto-round's
        ``iters`` / ``provider`` in a GPTQ config, ...); the library that wrote a checkpoint loads
        it, and so must quantplug. Every known key is still validated; a backend refuses a kept key
        that would change the stored weights in its ``validate()`` (``self.extra``). A subclass's
        ``from_dict`` that ends in ``super().from_dict`` gets this for free. Configs a user writes
        go through ``from_dict`` and stay strict."""
        token = _FROM_CHECKPOINT.set(True)
        try:
            return cls.from_dict(data)
        finally:
            _FROM_CHECKPOINT.reset(token)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{cls.__name__}: not valid JSON: {exc}", value=text, allowed="a JSON object"
            ) from None
        return cls.from_dict(data)
