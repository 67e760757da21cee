"""Install hints for ``quant_method`` names, used only to write helpful error messages.

Nothing here decides behaviour: dispatch, ``select`` and every other code path see only the
registered plugins, first- and third-party alike. This is data a hint may quote.
"""

from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path

#: quant_method -> the distribution that provides it (first-party plugins; hints only)
PLUGIN_FOR_METHOD: dict[str, str] = {
    "bitsandbytes": "quantplug-bnb",
    "bitsandbytes_4bit": "quantplug-bnb",
    "bitsandbytes_8bit": "quantplug-bnb",
    "hqq": "quantplug-hqq",
    "quanto": "quantplug-quanto",
    "torchao": "quantplug-torchao",
    "rtn": "quantplug-rtn",
    "gptq": "quantplug-gptqmodel",
    "awq": "quantplug-gptqmodel",
    "auto-round": "quantplug-autoround",
    "compressed-tensors": "quantplug-compressed-tensors",
    "fp8": "quantplug-float",
    "mxfp8": "quantplug-float",
    "fbgemm_fp8": "quantplug-float",
    "mxfp4": "quantplug-float",
    "bitnet": "quantplug-bitnet",
    "eetq": "quantplug-gpu-formats",
    "spqr": "quantplug-gpu-formats",
    "higgs": "quantplug-gpu-formats",
    "vptq": "quantplug-vptq",
    "aqlm": "quantplug-aqlm",
    "quark": "quantplug-quark",
}

#: Transformers 5.24's ``QuantizationMethod`` values, for when Transformers is not installed
_TRANSFORMERS_5_24 = frozenset(
    [
        "aqlm",
        "auto-round",
        "awq",
        "bitnet",
        "bitsandbytes",
        "compressed-tensors",
        "eetq",
        "fbgemm_fp8",
        "fouroversix",
        "fp8",
        "fp_quant",
        "gemma",
        "gguf",
        "gptq",
        "higgs",
        "hqq",
        "metal",
        "mxfp4",
        "mxfp8",
        "nvfp4",
        "quanto",
        "quark",
        "sinq",
        "spqr",
        "torchao",
        "vptq",
    ]
)


@functools.cache
def transformers_methods() -> frozenset[str]:
    """The ``quant_method`` names Transformers implements: read from the installed Transformers
    (its ``QuantizationMethod``; ~3 s to import, so only error paths call this), else 5.24's list."""
    try:
        from transformers.utils.quantization_config import QuantizationMethod
    except ImportError:
        return _TRANSFORMERS_5_24
    return frozenset(m.value for m in QuantizationMethod)


def install_command(dist: str) -> str:
    """A command that installs the first-party plugin ``dist``. The plugins are not on the package
    index yet, so where quantplug was installed from a checkout (pip records its folder in
    ``direct_url.json``; editable installs too), it is that checkout's ``plugins/<name>`` folder."""
    name = dist.removeprefix("quantplug-").replace("-", "_")  # quantplug-gpu-formats: plugins/gpu_formats
    root = _source_checkout()
    if root is not None and (root / "plugins" / name / "pyproject.toml").is_file():
        return f"pip install {shlex.quote(str(root / 'plugins' / name))}"
    return (
        f"pip install ./plugins/{name} from a quantplug source checkout ({dist} is not on the package "
        f"index yet)"
    )


def _source_checkout() -> Path | None:
    """The folder quantplug was pip-installed from, when it was a local folder."""
    from importlib.metadata import PackageNotFoundError, distribution
    from urllib.parse import unquote, urlparse

    try:
        data = json.loads(distribution("quantplug").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, json.JSONDecodeError, OSError):
        return None
    url = urlparse(str(data.get("url", "")))
    return Path(unquote(url.path)) if url.scheme == "file" and "dir_info" in data else None


def install_hint(method: str) -> str:
    """One sentence on how to get a backend for ``method``."""
    key = method.strip().lower()
    if key in PLUGIN_FOR_METHOD:
        dist = PLUGIN_FOR_METHOD[key]
        return f"quant_method {method!r} is provided by the plugin {dist}: {install_command(dist)}"
    if key in transformers_methods():
        return (
            f"quant_method {method!r} is a method Transformers implements; no installed quantplug plugin "
            f"provides it and quantplug knows of none that does: load the model with transformers directly, "
            f"install a third-party quantplug plugin for it if you know one, or write one (see CONTRIBUTING.md)"
        )
    return (
        f"no known plugin provides quant_method {method!r}; if a third-party plugin does, install it, "
        f"and check the spelling"
    )
