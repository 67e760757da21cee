"""auto-round beside quantplug's unfused mixture-of-experts modules."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def keep_unfused_experts():
    """While AutoRound runs: auto-round replaces some MoE blocks by class name (gpt-oss's
    ``GptOssMLP``) with its own unfused block, built from the stacked ``experts.gate_up_proj`` it
    expects, and skips a block whose experts are per-expert Linears already (its
    ``is_linearized_layout``: a ModuleList of gate/up/down_proj modules). quantplug's unfused experts
    (``quantplug.UnfusedExperts``, which the walk planned) are per-expert Linears too: it
    skips those as well, so the blocks, their routers and the planned Linears stay the model's."""
    from auto_round.modeling.fused_moe import replace_modules

    import quantplug

    linearized = getattr(replace_modules, "is_linearized_layout", None)
    if linearized is None:
        yield
        return
    replace_modules.is_linearized_layout = lambda module: (
        isinstance(module, quantplug.UnfusedExperts) or linearized(module)
    )
    try:
        yield
    finally:
        replace_modules.is_linearized_layout = linearized
