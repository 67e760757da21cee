"""quantplug's Transformers load hook, installed at interpreter start-up by ``quantplug-hook.pth``.

It makes ``AutoModel*.from_pretrained(folder)`` of a quantplug checkpoint right in any process,
without ``import quantplug`` or ``quantplug.register_with_transformers()`` first: ``install()``
puts one finder on ``sys.meta_path`` that does nothing until ``transformers.quantizers.auto`` is
imported, then wraps that module's ``get_hf_quantizer`` (``guard``). The wrapper imports quantplug
(``quantplug.integrations.guard``) only when a model with a quantization config is loaded: a method
a quantplug backend provides registers the bridge, a quantplug checkpoint of a method Transformers
also implements (quanto, hqq) is routed to the bridge, and a checkpoint Transformers would load
wrong raises an error that says what to do.

Cost: importing this module at start-up (about 0.1 ms; it imports nothing) and one string
comparison per later import; ``import transformers`` gains a function definition. Set
``QUANTPLUG_TRANSFORMERS_HOOK=0`` to turn it off. Nothing here may break Python start-up or
``import transformers``.
"""

import os
import sys

TARGET = "transformers.quantizers.auto"
ENV_VAR = "QUANTPLUG_TRANSFORMERS_HOOK"
MARK = "__quantplug_guard__"


def guard(auto):
    """Wrap ``auto.get_hf_quantizer`` (and ``modeling_utils``' binding of it, if already made) so
    that quantplug checks a model's quantization config first. Idempotent; False if ``auto`` has
    no such function (a Transformers version this hook does not know)."""
    original = getattr(auto, "get_hf_quantizer", None)
    if original is None:
        return False
    guarded = original
    if not getattr(original, MARK, False):

        def guarded(config, quantization_config=None, *args, **kwargs):
            from quantplug.integrations.guard import before_transformers_load

            before_transformers_load(config, quantization_config)
            return original(config, quantization_config, *args, **kwargs)

        guarded.__wrapped__ = original
        guarded.__name__ = original.__name__
        guarded.__qualname__ = original.__qualname__
        guarded.__doc__ = original.__doc__
        setattr(guarded, MARK, True)
        auto.get_hf_quantizer = guarded
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is not None and getattr(modeling, "get_hf_quantizer", None) is original:
        modeling.get_hf_quantizer = guarded
    return True


class _Loader:
    """Delegates to the real loader, then guards the loaded module."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if not guard(module):
            import warnings

            warnings.warn(
                "quantplug: this Transformers has no quantizers.auto.get_hf_quantizer, so quantplug cannot check "
                "quantized checkpoints in from_pretrained: load quantplug checkpoints with quantplug.load",
                RuntimeWarning,
                stacklevel=2,
            )


class Finder:
    """A ``sys.meta_path`` finder that only answers for ``transformers.quantizers.auto``."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def enabled():
    """False when ``QUANTPLUG_TRANSFORMERS_HOOK`` is 0 / false / no / off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def install():
    """Put the finder first on ``sys.meta_path`` (once), unless turned off by the environment."""
    if enabled() and Finder not in sys.meta_path and TARGET not in sys.modules:
        sys.meta_path.insert(0, Finder)
