"""Documentation matches the code: every hookspec is documented with its exact signature."""

import inspect
from pathlib import Path

import quantplug.hookspecs

ROOT = Path(__file__).resolve().parents[1]


def hookspecs():
    return [
        (name, fn)
        for name, fn in vars(quantplug.hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "quantplug_spec")
    ]


def test_there_are_hookspecs():
    assert [name for name, _ in hookspecs()] == ["register_backends"]


def test_every_hookspec_is_documented_with_its_exact_signature():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for name, fn in hookspecs():
        # hookspecs.py uses postponed annotations: the signature holds them as source strings
        signature = f"{name}{inspect.signature(fn)}".replace("'", "")
        assert f"`{signature}`" in text, f"CONTRIBUTING.md lacks the hook signature `{signature}`"


def test_every_hookspec_docstring_has_a_complete_example():
    for name, fn in hookspecs():
        doc = inspect.getdoc(fn) or ""
        assert "Example" in doc and "@quantplug.hookimpl" in doc and f"def {name}(" in doc, name


def test_rtn_descriptor_in_contributing_matches_the_plugin():
    # The walkthrough quotes the reference plugin: keep them in step.
    text = (ROOT / "CONTRIBUTING.md").read_text()
    source = (ROOT / "plugins/rtn/quantplug_rtn/__init__.py").read_text()
    for line in (
        'quantizer="quantplug_rtn.quantizer:RtnQuantizer"',
        "max_rel_error={8: 0.02, 4: 0.16, 2: 0.75}",
    ):
        assert line in source and line in text, line


def test_every_quantizer_method_is_in_the_contributing_table():
    import quantplug

    text = (ROOT / "CONTRIBUTING.md").read_text()
    methods = [
        n for n, f in vars(quantplug.Quantizer).items() if inspect.isfunction(f) and not n.startswith("_")
    ]
    assert "check_config" in methods
    missing = [n for n in methods if f"| `{n}(" not in text]
    assert not missing, f"CONTRIBUTING.md's quantizer table lacks {missing}"
