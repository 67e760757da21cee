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
  (``Backend.transformers_format`` is false): ``CheckpointError`` saying to use ``quantplug.load``;
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

__all__ = ["before_transformers_load", "check_checkpoint_config", "hook_status", "install", "installed"]

_GUARD = "__quantplug_guard__"

#: Methods Transformers knows but cannot have saved pre-quantized (its quantizer is not
#: serializable), so a pre-quantized folder naming them is never in Transformers' format, whoever
#: wrote it: what Transformers would do with it instead.
NOT_SAVED_BY_TRANSFORMERS = {
    "quanto": "Transformers cannot save quanto models, so it would build fresh quanto layers and fill the "
    "weights it does not find in the checkpoint with random values",
}


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


def before_transformers_load(config: Any, quantization_config: Any = None) -> None:
    """Called by the guard with ``get_hf_quantizer``'s first two arguments (the model config, the
    ``quantization_config`` given to ``from_pretrained``)."""
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
        check_checkpoint_config(from_checkpoint)


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


def check_checkpoint_config(qconfig: dict[str, Any]) -> None:
    """Make Transformers load a checkpoint with this ``quantization_config`` right, or raise."""
    method = qconfig.get("quant_method")
    if not isinstance(method, str) or qconfig.get("load_in_4bit") or qconfig.get("load_in_8bit"):
        return  # Transformers' own checks (bitsandbytes' legacy keys, no quant_method)
    from ..dispatch import get_backend
    from .transformers import bridged_methods, register_with_transformers, transformers_methods

    if method in bridged_methods():
        return
    try:
        backend = get_backend(method)  # AmbiguousBackendError propagates: never settled by order
    except UnknownMethodError as exc:
        backend, missing = None, exc
    known = method in transformers_methods()
    if backend is not None and not known:
        register_with_transformers()
        return
    if backend is None and not known and method in PLUGIN_FOR_METHOD:
        raise UnknownMethodError(
            f"from_pretrained: this checkpoint was quantized by quantplug's {method!r} backend. Without it, "
            f"Transformers would skip the quantization and load the quantized tensors as plain weights (a "
            f"wrong model). {missing}",
            method=method,
        ) from missing
    if backend is not None and known and not backend.transformers_format and _accepts(backend, qconfig):
        raise CheckpointError(
            f"from_pretrained: this checkpoint was written by quantplug's {method!r} backend "
            f"({backend.plugin or 'a plugin'}) in its own format, which Transformers' {method!r} integration "
            f"cannot read (it would load a wrong model). Load it with quantplug.load(path): it returns the "
            f"same Transformers model class"
        )
    if backend is None and method in NOT_SAVED_BY_TRANSFORMERS:
        raise CheckpointError(
            f"from_pretrained: this pre-quantized {method!r} checkpoint was not written by Transformers: "
            f"{NOT_SAVED_BY_TRANSFORMERS[method]}. It is most likely a quantplug checkpoint: load it with "
            f"quantplug.load(path). {missing}"
        ) from missing


def _accepts(backend: Any, qconfig: dict[str, Any]) -> bool:
    from ..errors import ConfigError

    try:
        backend.config.from_dict(qconfig)
    except ConfigError:
        return False
    return True
