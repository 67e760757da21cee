"""Install hints for ``quant_method`` names, used only to write helpful error messages.

Nothing here decides behaviour: dispatch goes through the registered plugins alone.
"""

from __future__ import annotations

#: quant_method -> the distribution that provides it
PLUGIN_FOR_METHOD: dict[str, str] = {
    "bitsandbytes": "quantplug-bnb",
    "bitsandbytes_4bit": "quantplug-bnb",
    "bitsandbytes_8bit": "quantplug-bnb",
    "hqq": "quantplug-hqq",
    "quanto": "quantplug-quanto",
    "torchao": "quantplug-torchao",
    "rtn": "quantplug-rtn",
}

#: methods Transformers implements for which no quantplug plugin exists yet
TRANSFORMERS_ONLY: frozenset[str] = frozenset(
    {
        "awq",
        "gptq",
        "aqlm",
        "quark",
        "fouroversix",
        "fp_quant",
        "eetq",
        "higgs",
        "compressed-tensors",
        "fbgemm_fp8",
        "bitnet",
        "vptq",
        "spqr",
        "fp8",
        "gguf",
        "nvfp4",
        "mxfp8",
        "auto-round",
        "mxfp4",
        "metal",
        "sinq",
        "gemma",
    }
)


def install_hint(method: str) -> str:
    """One sentence on how to get a backend for ``method``."""
    key = method.strip().lower()
    if key in PLUGIN_FOR_METHOD:
        dist = PLUGIN_FOR_METHOD[key]
        return f"quant_method {method!r} is provided by the plugin {dist}: pip install {dist}"
    if key in TRANSFORMERS_ONLY:
        return (
            f"quant_method {method!r} is a method Transformers implements, but no quantplug plugin exists "
            f"for it yet: load it with transformers directly, or write a plugin (see CONTRIBUTING.md)"
        )
    return (
        f"no known plugin provides quant_method {method!r}; if a third-party plugin does, install it, "
        f"and check the spelling"
    )
