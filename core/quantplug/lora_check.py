"""The conformance kit's LoRA check: does fine-tuning with PEFT work on a backend's layers?

``check_lora(config, folder)`` quantizes a tiny random Llama with ``config`` (calibrated on token
ids where the config needs it), evaluates it once (an eval-mode forward under ``torch.no_grad()``,
as a user does before fine-tuning: a backend whose first inference forward switches its layers to
a kernel without a backward, as bitsandbytes' CPU repack does, fails here), saves it, applies
PEFT's ``prepare_model_for_kbit_training`` and a LoRA adapter (r=8 on q_proj and v_proj), trains
12 AdamW steps on one batch and asserts what QLoRA users rely on: every adapter weight gets a
gradient, the loss falls, only the adapter
weights change (the quantized layers stay bit-identical), and the adapter saved with PEFT's
``save_pretrained`` re-applies to the model loaded fresh with ``quantplug.load``, giving the same
logits. A backend whose presets declare ``trainable=True`` runs it in its tests, with ``peft`` in
its test dependencies. Imports peft only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["check_lora", "check_lora_targets", "check_preset", "trainable", "trainable_test", "why_not_here"]


def trainable(config: Any) -> tuple[bool, str]:
    """Whether adapters train on layers quantized with ``config`` (the ``trainable`` flag of the
    preset that builds exactly ``config``, else the backend's), and where that flag comes from."""
    from .candidates import preset_of
    from .dispatch import get_backend

    backend = get_backend(config.quant_method)
    preset = preset_of(config)
    if preset is not None and preset.trainable is not None:
        return preset.trainable, f"preset {backend.name}:{preset.name}"
    return backend.capabilities.trainable, f"backend {backend.name!r}"


def check_lora_targets(model: Any, lora_config: Any) -> list[str]:
    """The quantized layers of ``model`` that ``lora_config`` (PEFT's ``LoraConfig``) targets, or a
    ``ConfigError`` naming them when their backend's layers do not train adapters (its ``trainable``
    flag, which the LoRA check holds it to: PEFT refuses rtn's and compressed-tensors' layers with
    "Target module ... is not supported", and some wrapped layers have no backward). Call it before
    ``peft.get_peft_model``; a model quantplug did not quantize gives ``[]``."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from .errors import ConfigError
    from .walk import quantized_info

    info = quantized_info(model)
    if info is None:
        return []
    wanted = getattr(lora_config, "target_modules", None)
    if wanted == "all-linear":  # PEFT expands it from nn.Linear: quantized layers would drop out
        hit = list(info.modules)
    else:
        hit = [name for name in info.modules if check_target_module_exists(lora_config, name)]
    ok, source = trainable(info.config)
    if not hit or ok:
        return hit
    shown = ", ".join(map(repr, hit[:3])) + (f" and {len(hit) - 3} more" if len(hit) > 3 else "")
    layer = type(model.get_submodule(hit[0])).__name__
    wanted = sorted(wanted) if isinstance(wanted, (set, frozenset, list, tuple)) else wanted
    raise ConfigError(
        f"LoRA target_modules={wanted!r} match {len(hit)} layer{'s' if len(hit) > 1 else ''} quantized by "
        f"{info.config.quant_method!r} "
        f"({shown}: {layer}), on which adapters do not train ({source} is not trainable). Quantize with a "
        f"trainable preset (`quantplug select --finetune` lists them), keep these layers in full "
        f"precision (modules_to_not_convert), or target other modules",
        field="target_modules",
        value=wanted,
        allowed="modules not quantized by a non-trainable backend",
    )


def _quantized_tiny_llama(config: Any, device: str = "cpu") -> Any:
    """The kit's tiny Llama quantized with ``config``, calibrated on token ids other than the
    check's when the config needs calibration (GPTQ, AWQ, auto-round, static activation scales)."""
    from .convert import quantize
    from .dispatch import AutoQuantizer
    from .testing import tiny_llama, token_ids

    model = tiny_llama().to(device)
    data = None
    if AutoQuantizer.from_config(config).needs_calibration():
        data = [token_ids(shape=(2, 16), seed=seed).to(device) for seed in (7, 8)]
    quantize(model, config, progress=False, calibration_data=data)
    return model


def _snapshot(model: Any) -> dict[str, Any]:
    """Every tensor of the model's state, copied; a library's tensor subclass (torchao's) as the
    list of the plain tensors it holds (``__tensor_flatten__``), which ``torch.equal`` can compare."""
    import torch

    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        flatten = getattr(value, "__tensor_flatten__", None)
        if type(value) in (torch.Tensor, torch.nn.Parameter) or flatten is None:
            out[key] = value.detach().clone()
        else:
            out[key] = [getattr(value, name).detach().clone() for name in flatten()[0]]
    return out


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _assert_gradients(adapters: dict[str, Any], step: int) -> None:
    """Every adapter weight got a gradient from ``backward`` (a quantized layer whose forward ran a
    kernel without a backward stops it: the adapters before it get None and the loss stays flat)."""
    missing = [name for name, p in adapters.items() if p.grad is None]
    assert not missing, (
        f"step {step}: {len(missing)} of {len(adapters)} adapter weights got no gradient after the model "
        f"was evaluated once under torch.no_grad() ({', '.join(missing[:3])}"
        f"{' ...' if len(missing) > 3 else ''}): backward stops at a quantized layer"
    )


def _train(model: Any, ids: Any, steps: int) -> list[float]:
    """``steps`` AdamW steps on the adapters, holding each step to ``_assert_gradients``; the losses."""
    import torch

    adapters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(adapters.values(), lr=5e-3)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = model(ids, labels=ids).loss
        loss.backward()
        _assert_gradients(adapters, step)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _base_key(key: str) -> str:
    """A PEFT model's state-dict key as the wrapped model's (``base_model.model.`` and
    ``.base_layer`` dropped)."""
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def check_lora(config: Any, folder: str | Path, steps: int = 12, device: str = "cpu") -> dict[str, Any]:
    """Run the LoRA check (see the module docstring) with ``config``, writing into ``folder``;
    returns the losses, the LoRA layer class PEFT used and the largest logit difference after
    reloading. Raises AssertionError where LoRA does not work as it should."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    from .loading import load
    from .saving import save
    from .testing import token_ids

    folder = Path(folder)
    model = _quantized_tiny_llama(config, device)
    # taken before anything runs: a state_dict() between the evaluation and training could undo
    # what the evaluation left behind and hide it
    before = _snapshot(model)
    ids = token_ids().to(device)
    with torch.no_grad():  # evaluate first, as users do: what inference leaves must not stop training
        model.eval()(ids)
    save(model, folder / "base")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    layer = type(model.base_model.model.model.layers[0].self_attn.q_proj)
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    losses = _train(model, ids, steps)
    assert losses[-1] < losses[0] - 0.1, f"the loss does not fall: {losses}"
    after = {_base_key(k): v for k, v in _snapshot(model).items() if "lora_" not in k}
    changed = sorted(k for k in before if k not in after or not _same(before[k], after[k]))
    assert not changed, f"tensors other than the adapter changed: {changed[:5]}"
    params = dict(model.named_parameters())
    assert any(not torch.equal(initial[k], params[k]) for k in initial), "no adapter weight changed"
    model.eval()
    model.save_pretrained(folder / "adapter")
    fresh = PeftModel.from_pretrained(load(folder / "base", device=device), folder / "adapter").eval()
    with torch.no_grad():
        want, got = model(ids).logits, fresh(ids).logits
    diff = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (
        f"the reloaded adapter gives other logits ({diff})"
    )
    return {"losses": losses, "lora_layer": layer, "reload_max_diff": diff}


def why_not_here(backend: Any, preset: Any, device: str = "cpu") -> str | None:
    """Why the LoRA check cannot run ``preset`` on ``device`` (the backend does not run there), or None."""
    from .dispatch import AutoQuantizer
    from .errors import QuantplugError

    quantizer = AutoQuantizer.from_config(preset.build(backend.config))
    try:
        quantizer.validate_environment(device)
    except QuantplugError as exc:
        return str(exc).splitlines()[0]
    return None


def check_preset(backend: Any, preset: Any, folder: str | Path) -> None:
    """Hold ``preset``'s ``trainable`` flag (or, when None, the backend's) to the LoRA check: a
    trainable preset passes ``check_lora``, any other fails it. Call ``why_not_here`` first: a
    preset the check cannot run here must not claim ``trainable``."""
    trainable = preset.is_trainable(backend.capabilities)
    config = preset.build(backend.config)
    _check_targets_follow_flag(config, trainable)
    if trainable:
        assert check_lora(config, folder)["reload_max_diff"] <= 1e-5
        return
    try:
        check_lora(config, folder)
    except (AssertionError, RuntimeError, ValueError):  # ValueError: PEFT refuses the layer class
        return
    raise AssertionError(f"{preset.name} passes the LoRA check but does not declare trainable=True")


def _check_targets_follow_flag(config: Any, trainable: bool) -> None:
    """``check_lora_targets`` passes the check's q_proj / v_proj targets on a trainable preset and
    refuses them on any other."""
    from peft import LoraConfig

    from .errors import ConfigError

    model = _quantized_tiny_llama(config)
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    if trainable:
        assert len(check_lora_targets(model, lora)) == 4
        return
    try:
        check_lora_targets(model, lora)
    except ConfigError as exc:
        assert "model.layers.0.self_attn.q_proj" in str(exc)
        return
    raise AssertionError(
        f"check_lora_targets accepts {config.quant_method} layers that do not declare trainable"
    )


def trainable_test(backend_name: str):
    """A pytest test, parametrized over ``backend_name``'s presets, holding each preset's
    ``trainable`` flag to the LoRA check (``check_preset``); a preset the check cannot run here
    (``why_not_here``) is skipped, and must not claim ``trainable``. In a plugin's tests::

        test_trainable_is_what_the_lora_check_shows = trainable_test("mymethod")
    """
    import pytest

    from .candidates import presets_of
    from .dispatch import get_backend

    backend = get_backend(backend_name)

    @pytest.mark.parametrize("preset", presets_of(backend), ids=lambda p: p.name)
    def test(preset, tmp_path):
        why = why_not_here(backend, preset)
        if why is not None:
            assert not preset.is_trainable(backend.capabilities), (
                f"{preset.name} claims trainable without the check"
            )
            pytest.skip(f"{preset.name}: {why}")
        check_preset(backend, preset, tmp_path)

    return test
