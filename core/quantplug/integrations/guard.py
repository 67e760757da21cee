"""The guard on Transformers' ``from_pretrained``: no quantplug checkpoint becomes a wrong model.

Transformers reads ``config.json``'s ``quantization_config`` in ``get_hf_quantizer``. For a
``quant_method`` it does not know, it warns "Unknown quantization type ... we will skip the
quantization" and loads the quantized tensors as if they were plain weights; for a method it knows
but whose quantplug checkpoints are not in its format (quanto, hqq), it builds its own layers and
fills them with the wrong tensors or random values. ``install`` wraps ``get_hf_quantizer`` so that,
before Transformers decides, a checkpoint's quantization config is checked here:

- a method an installed quantplug backend provides, and Transformers does not know: the bridge is
  registered (``register_with_transformers``) and the model loads right;
- a method of one of quantplug's own plugins that is not installed: ``UnknownMethodError`` saying
  what to install;
- a method Transformers knows, with a quantplug checkpoint in the plugin's own format
  (``Backend.transformers_format`` is false, e.g. quanto and hqq): when the checkpoint is a local
  folder whose safetensors header says quantplug wrote it with that method (``quantplug_version``
  and ``quant_method`` in the metadata ``checkpoint.header_metadata`` writes), it is routed to the
  bridge (``route``: registered with Transformers under ``quantplug-<method>``, and the config's
  ``quant_method`` read as that name for this load) and loads right; a local folder without that
  header is left to Transformers when its config is in Transformers' form (the plugin's config
  class refuses it, e.g. Transformers' nested hqq ``quant_config``); quanto is refused (Transformers
  cannot have saved it). A config in the plugin's form without that header (a Hub id, a
  ``subfolder``, a header another tool rewrote) is refused with ``CheckpointError`` saying to use
  ``quantplug.load``;
- anything else (no quantization config, a format Transformers reads): untouched, at the cost of
  one attribute lookup.

The wrapper itself is ``_quantplug_hook.guard`` (a top-level module that ``quantplug-hook.pth``
imports at start-up and that installs it when ``transformers.quantizers.auto`` is first imported),
so it is active in every process where quantplug is installed; ``register_with_transformers()``
installs it too (for processes started with the hook turned off). Importing this module imports
neither torch nor Transformers.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import CheckpointError, UnknownMethodError
from ..hints import PLUGIN_FOR_METHOD

__all__ = [
    "before_transformers_load",
    "check_checkpoint_config",
    "hook_status",
    "install",
    "installed",
    "route",
    "written_by_quantplug",
]

_GUARD = "__quantplug_guard__"

#: Methods Transformers knows but cannot have saved pre-quantized (its quantizer is not
#: serializable), so a pre-quantized folder naming them is never in Transformers' format, whoever
#: wrote it: what Transformers would do with it instead.
NOT_SAVED_BY_TRANSFORMERS = {
    "quanto": "Transformers cannot save quanto models, so it would build fresh quanto layers and fill the "
    "weights it does not find in the checkpoint with random values",
}


#: First-party backends whose checkpoints are in their own format under a name Transformers
#: implements (``Backend.transformers_format`` false): used when the plugin is not usable here.
OWN_FORMAT = frozenset({"hqq", "quanto"})

#: A checkpoint routed to the bridge is registered with Transformers under this prefix + its method.
ROUTE_PREFIX = "quantplug-"
#: routed name -> (config class, quantizer class) registered with Transformers by ``route``
_routes: dict[str, tuple[type, type]] = {}


def installed() -> bool:
    """Whether the guard is on Transformers' ``get_hf_quantizer`` in this process."""
    from _quantplug_hook import MARK

    auto = sys.modules.get("transformers.quantizers.auto")
    return auto is not None and getattr(getattr(auto, "get_hf_quantizer", None), MARK, False)


def hook_status() -> tuple[bool, str]:
    """Whether the start-up hook is on in this process, and a sentence for ``doctor``. Off through
    ``QUANTPLUG_TRANSFORMERS_HOOK`` is fine (the user chose it); missing is a problem."""
    import _quantplug_hook as hook

    if hook.Finder in sys.meta_path or installed():
        return True, "Transformers load hook: on (from_pretrained checks quantplug checkpoints)"
    if not hook.enabled():
        return True, (
            f"Transformers load hook: off ({hook.ENV_VAR}={os.environ.get(hook.ENV_VAR)}); call "
            "quantplug.register_with_transformers() before from_pretrained of a quantplug checkpoint"
        )
    return False, (
        "Transformers load hook: not active: quantplug-hook.pth did not run at start-up (python -S, or "
        "an install without the file: reinstall quantplug with pip); until then plain from_pretrained of an "
        "rtn or other quantplug-only checkpoint loads a wrong model: call quantplug.register_with_transformers() first"
    )


def install() -> bool:
    """Guard the loaded Transformers' ``get_hf_quantizer`` (what the start-up hook does when
    Transformers is imported; ``register_with_transformers`` calls this for processes started with
    the hook off). Idempotent; False when Transformers is not loaded or has no such function."""
    from _quantplug_hook import guard

    auto = sys.modules.get("transformers.quantizers.auto")
    return auto is not None and guard(auto)


def _from_checkpoint(config: Any) -> Any:
    """The quantization config ``config.json`` gave, where Transformers looks for it."""
    found = getattr(config, "quantization_config", None)
    if found is None:
        try:
            found = getattr(config.get_text_config(decoder=True), "quantization_config", None)
        except Exception:  # not a PretrainedConfig: Transformers will say so itself
            return None
    return found


def _holder(config: Any) -> Any:
    """The config object holding the checkpoint's ``quantization_config`` (the model config or its
    text config)."""
    if getattr(config, "quantization_config", None) is not None:
        return config
    return config.get_text_config(decoder=True)


def written_by_quantplug(folder: Any, method: str) -> bool | None:
    """Whether the checkpoint in local folder ``folder`` was written by quantplug with ``method``
    (its first safetensors file's header metadata records ``quantplug_version`` and that
    ``quant_method``): True / False, or None when it cannot tell (not a local folder, no readable
    safetensors file)."""
    import json
    from pathlib import Path

    from ..errors import CheckpointError
    from ..safetensors_header import read_header

    if not isinstance(folder, (str, os.PathLike)) or not str(folder) or not Path(folder).is_dir():
        return None
    folder = Path(folder)
    try:
        if (folder / "model.safetensors.index.json").is_file():
            weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
            first = folder / sorted(set(weight_map.values()))[0]
        else:
            first = folder / "model.safetensors"
        meta = read_header(first).metadata
    except (OSError, ValueError, KeyError, TypeError, IndexError, CheckpointError):
        return None
    return bool(meta.get("quantplug_version")) and meta.get("quant_method") == method


def before_transformers_load(config: Any, quantization_config: Any = None) -> None:
    """Called by the guard with ``get_hf_quantizer``'s first two arguments (the model config, the
    ``quantization_config`` given to ``from_pretrained``). A checkpoint routed to the bridge gets
    its ``quantization_config``'s ``quant_method`` replaced by the routed name (``route``)."""
    from_checkpoint = _from_checkpoint(config)
    if from_checkpoint is None and quantization_config is None:
        return
    from ..config import QuantConfig

    if isinstance(quantization_config, QuantConfig):  # from_pretrained(..., quantization_config=RtnConfig())
        from .transformers import register_with_transformers

        register_with_transformers()
    if isinstance(quantization_config, dict):
        _check_user_dict(quantization_config)
    if isinstance(from_checkpoint, dict):
        folder = getattr(config, "_name_or_path", None)
        routed = check_checkpoint_config(from_checkpoint, folder)
        if routed is not None:
            _holder(config).quantization_config = {**from_checkpoint, "quant_method": routed}


def _check_user_dict(qconfig: dict[str, Any]) -> None:
    """A dict given to ``from_pretrained(quantization_config=...)`` is the user's, and a quantplug
    backend's config from it stays strict (an unknown key is a ``ConfigError``): the bridge's
    ``from_dict``, which Transformers calls for it and for ``config.json`` alike, keeps unknown keys."""
    method = qconfig.get("quant_method")
    if not isinstance(method, str):
        return
    from ..dispatch import get_backend
    from .transformers import transformers_methods

    if method in transformers_methods():
        return  # Transformers' own config class reads it
    try:
        backend = get_backend(method)
    except UnknownMethodError:
        return  # Transformers says what it does with an unknown method
    backend.config.from_dict(qconfig)


def check_checkpoint_config(qconfig: dict[str, Any], folder: Any = None) -> str | None:
    """Make Transformers load a checkpoint with this ``quantization_config`` (read from local
    folder ``folder``, when known) right, or raise. Returns the name to route it under when it must
    go to the bridge although Transformers implements its method (``route``), else None."""
    method = qconfig.get("quant_method")
    if not isinstance(method, str) or qconfig.get("load_in_4bit") or qconfig.get("load_in_8bit"):
        return None  # Transformers' own checks (bitsandbytes' legacy keys, no quant_method)
    from ..dispatch import get_backend
    from .transformers import bridged_methods, register_with_transformers, transformers_methods

    if method in bridged_methods():
        return None
    try:
        backend = get_backend(method)  # AmbiguousBackendError propagates: never settled by order
    except UnknownMethodError as exc:
        backend, missing = None, exc
    known = method in transformers_methods()
    if backend is not None and not known:
        register_with_transformers()
        return None
    if backend is None and not known and method in PLUGIN_FOR_METHOD:
        raise UnknownMethodError(
            f"from_pretrained: this checkpoint was quantized by quantplug's {method!r} backend. Without it, "
            f"Transformers would skip the quantization and load the quantized tensors as plain weights (a "
            f"wrong model). {missing}",
            method=method,
        ) from missing
    if not known or (backend is not None and backend.transformers_format):
        return None
    written = written_by_quantplug(folder, method)
    if backend is None:
        _refuse_without_plugin(method, written, missing)
        return None
    if written:
        return route(method)
    if written is False and method in NOT_SAVED_BY_TRANSFORMERS:
        raise CheckpointError(
            f"from_pretrained: this pre-quantized {method!r} checkpoint was written neither by Transformers "
            f"({NOT_SAVED_BY_TRANSFORMERS[method]}) nor by quantplug (its safetensors header has no "
            f"quantplug metadata for {method!r}): neither can load it right"
        )
    if _accepts(backend, qconfig):  # quantplug's form of the config, not Transformers'
        why = (
            "it is not a local folder whose safetensors header says who wrote it"
            if written is None
            else "its safetensors header has no quantplug metadata (rewritten by another tool?)"
        )
        raise CheckpointError(
            f"from_pretrained: this {method!r} checkpoint's quantization_config has the form quantplug's "
            f"{method!r} backend ({backend.plugin or 'a plugin'}) writes, which Transformers' {method!r} "
            f"integration cannot read (it would load a wrong model or fail), but {why}. If quantplug wrote "
            f"it, load it with quantplug.load(path): it returns the same Transformers model class"
        )
    return None


def _refuse_without_plugin(method: str, written: bool | None, missing: Exception) -> None:
    """Raise for a checkpoint of a method Transformers implements whose quantplug backend is not
    usable here (not installed, disabled), when Transformers would load it wrong."""
    if written and method in OWN_FORMAT:
        raise CheckpointError(
            f"from_pretrained: this checkpoint was written by quantplug's {method!r} backend in its own "
            f"format, which Transformers' {method!r} integration cannot read (it would load a wrong "
            f"model), and that backend is not usable here: {missing}"
        ) from missing
    if method in NOT_SAVED_BY_TRANSFORMERS:
        raise CheckpointError(
            f"from_pretrained: this pre-quantized {method!r} checkpoint was not written by Transformers: "
            f"{NOT_SAVED_BY_TRANSFORMERS[method]}. It is most likely a quantplug checkpoint: load it with "
            f"quantplug.load(path). {missing}"
        ) from missing


def route(method: str) -> str:
    """Register with Transformers (once per process) the bridge for backend ``method`` under the
    name ``quantplug-<method>``, and return that name: a checkpoint whose ``quant_method`` reads as
    that name loads through the bridge although Transformers implements ``method`` itself. Its
    ``config.json`` keeps ``method`` (the bridge config's ``to_dict`` is quantplug's)."""
    from transformers.quantizers import auto as hf_auto

    from . import transformers as bridge
    from .hf_quantizer import QuantplugHfQuantizer

    name = ROUTE_PREFIX + method
    with bridge._lock:
        if name not in _routes:
            config_name = bridge.get_backend(method).config.__name__
            config_cls = type(
                config_name,
                (bridge.QuantplugHfConfig,),
                {
                    "quant_method": name,
                    "backend_method": method,
                    "__reduce__": _reduce_config,
                    "__module__": __name__,
                },
            )
            quantizer_cls = type(
                f"Routed{bridge._camel(method)}QuantplugHfQuantizer",
                (QuantplugHfQuantizer,),
                {
                    "quant_method": name,
                    "config_class": config_cls,
                    "rebuild": staticmethod(_routed_quantizer),
                    "__module__": __name__,
                },
            )
            hf_auto.register_quantization_config(name)(config_cls)
            hf_auto.register_quantizer(name)(quantizer_cls)
            _routes[name] = (config_cls, quantizer_cls)
    return name


def _reduce_config(self: Any) -> tuple[Any, tuple[Any, ...]]:
    return _routed_config, (self.quantplug_config,)


def _routed_config(config: Any) -> Any:
    """The routed bridge config of a quantplug config (pickle and deepcopy rebuild through this)."""
    return _routes[route(config.quant_method)][0](config)


def _routed_quantizer(config: Any, pre_quantized: bool) -> Any:
    return _routes[route(config.quant_method)][1](config, pre_quantized=pre_quantized)


def _accepts(backend: Any, qconfig: dict[str, Any]) -> bool:
    from ..errors import ConfigError

    try:
        backend.config.from_dict(qconfig)
    except ConfigError:
        return False
    return True
