"""mxfp4 (gpt-oss's experts format): the codec against Transformers' own dequantizer, a tiny gpt-oss
quantized, saved and read back by quantplug and by Transformers (its CPU dequantize path), a
checkpoint in gpt-oss's layout built from the format's definition, quantize-on-load, and refusals."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from quantplug_float.config import GPT_OSS_SKIPS  # noqa: E402
from quantplug_float.mxfp4 import Mxfp4Experts, dequantize, quantize  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.mxfp4 import FP4_VALUES, _convert_moe_packed_tensors  # noqa: E402

import quantplug  # noqa: E402
from quantplug.testing_models import tiny_llama, tiny_moe  # noqa: E402

IDS = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
EXPERTS = [f"model.layers.{n}.mlp.experts" for n in range(2)]
MXFP4 = {"quant_method": "mxfp4"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def hf_load(folder, dtype):
    """Transformers' own mxfp4 load: on a CPU without triton kernels it dequantizes the experts."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


# -- (a) the codec ------------------------------------------------------------------------------


def _nearest_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value of each ``y`` (|y| <= 6), a tie going to the larger magnitude (float64)."""
    grid = torch.tensor(sorted({abs(v) for v in FP4_VALUES}), dtype=torch.float64)
    dist = (y.abs().unsqueeze(-1) - grid).abs()
    # argmin takes the first minimum; reversed, the first is the larger magnitude
    pick = grid.flip(0)[dist.flip(-1).argmin(dim=-1)]
    return torch.where(y < 0, -pick, pick)


def test_codec_round_trip_is_transformers_dequantizer_and_rounds_as_defined():
    g = torch.Generator().manual_seed(0)
    # [E, in, out] as GptOssExperts holds it; magnitudes from 1e-30 to 1e3, a zero block, ties and
    # values one ulp either side of them (each block's max is 6: scale 1)
    w = torch.randn(3, 96, 64, generator=g) * torch.logspace(-30, 3, 96).reshape(1, 96, 1)
    w[0, :32, 0] = 0.0
    w[1, :32, 1] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4) * torch.tensor(
        [1.0, -1.0]
    ).repeat(16)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0])
    below, above = torch.nextafter(mids, torch.zeros(8)), torch.nextafter(mids, torch.full((8,), 9.0))
    w[2, :32, 2] = torch.cat([torch.tensor([6.0]), below[:7], -above, -below, above])  # one ulp off the ties
    blocks, scales = quantize(w.transpose(1, 2))  # per expert [out, in]: blocks along the inputs
    assert blocks.shape == (3, 64, 3, 16) and blocks.dtype == torch.uint8
    assert scales.shape == (3, 64, 3) and scales.dtype == torch.uint8
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        theirs = _convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
        mine = dequantize(blocks, scales, dtype).transpose(1, 2)
        assert theirs.dtype == mine.dtype == dtype
        assert torch.equal(
            theirs.view(torch.int16 if dtype != torch.float32 else torch.int32),
            mine.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32),
        )
    # the definition, in float64: scale = the least power of two >= amax / 6, values to the nearest
    x = w.transpose(1, 2).double().reshape(3, 64, 3, 32)
    amax = x.abs().amax(-1)
    scale = torch.exp2(scales.double() - 127)
    nonzero = amax > 0
    assert bool(
        (scale[nonzero] >= amax[nonzero] / 6).all() and (scale[nonzero] / 2 < amax[nonzero] / 6).all()
    )
    assert bool((scales[~nonzero] == 0).all())
    expected = _nearest_e2m1(x / scale.unsqueeze(-1)) * scale.unsqueeze(-1)
    got = _convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2).double()
    assert torch.equal(got.reshape(expected.shape), expected)
    assert torch.equal(
        got[1, 1, :32],
        w[1, :32, 1].double().sign()
        * torch.tensor([6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4, dtype=torch.float64),
    )  # every tie rounds up


# -- (b) quantize, save, load by quantplug and by Transformers ------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    model = tiny_moe("gpt_oss")
    ref = logits(model)
    report = quantplug.quantize(model, MXFP4)
    folder = tmp_path_factory.mktemp("mxfp4")
    quantplug.save(model, folder)
    return model, ref, report, folder


def _expert_bytes(module: Mxfp4Experts) -> tuple[int, int, list]:
    lo = module.layout
    weights = lo.num_experts * 3 * lo.hidden * lo.intermediate
    stored = sum(
        t.numel() * t.element_size() for k, t in module.state_dict().items() if not k.endswith("_bias")
    )
    floats = [(k, t.dtype, t.numel()) for k, t in module.state_dict().items() if t.is_floating_point()]
    return stored, weights, floats


def test_tiny_gpt_oss_quantized_saved_and_loaded(quantized):
    model, ref, report, folder = quantized
    assert report.converted == EXPERTS
    assert all(".self_attn." in k or k == "lm_head" for k in report.skipped)  # the router is no Linear
    err = rel(logits(model), ref)
    assert err < 0.25, err  # measured 0.18: two layers of 4-bit experts (one projection alone: 0.12)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "mxfp4", "modules_to_not_convert": list(GPT_OSS_SKIPS)}
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        names = [k for k in f.keys() if ".experts." in k]  # noqa: SIM118 (a safetensors handle)
        stored = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in names}
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"] == ([8, 512, 8, 16], "U8")
    assert stored["model.layers.0.mlp.experts.down_proj_scales"] == ([8, 256, 8], "U8")
    assert len(stored) == 12  # 6 per layer, nothing else: no per-expert split, no float copy

    loaded = quantplug.load(folder)
    assert torch.equal(logits(loaded), logits(model))
    for name in EXPERTS:
        experts = loaded.get_submodule(name)
        assert isinstance(experts, Mxfp4Experts)
        stored_bytes, weights, floats = _expert_bytes(experts)
        assert stored_bytes / weights == pytest.approx(0.53125)  # 0.5 + 1/32 bytes per weight
        lo = experts.layout
        assert sorted(floats) == [
            ("down_proj_bias", torch.float32, lo.num_experts * lo.hidden),
            ("gate_up_proj_bias", torch.float32, lo.num_experts * 2 * lo.intermediate),
        ]  # the biases only: no dequantized copy of the experts kept


def test_transformers_reads_our_checkpoint(quantized):
    model, _, _, folder = quantized
    hf = hf_load(folder, torch.float32)
    assert type(hf.get_submodule(EXPERTS[0])).__name__ == "GptOssExperts"  # dequantized on load
    assert rel(logits(hf), logits(model)) < 1e-3  # measured 5e-7: matmul summation order only
    prompt = IDS[:1, :6]
    with torch.no_grad():  # the one-token decode path routes as GptOssExperts does
        ours = model.generate(prompt, max_new_tokens=8, do_sample=False)
        theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


# -- (c) + (f) a checkpoint in gpt-oss's layout, built from the format's definition ---------------


def _gpt_oss_checkpoint(folder, scales_shape_wrong: bool = False) -> None:
    """A tiny gpt-oss saved as openai/gpt-oss-20b stores itself: experts as random e2m1 bytes and
    e8m0 scales (not made by quantplug's quantizer), bfloat16 biases, gpt-oss's mxfp4 config."""
    model = tiny_moe("gpt_oss", seed=3)
    model.config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GptOssForCausalLM"]
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": list(GPT_OSS_SKIPS)}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for key, t in model.state_dict().items():
        site, _, param = key.rpartition(".")
        if param in ("gate_up_proj", "down_proj"):
            e, n_in, n_out = t.shape
            scales_shape = (e, n_out, n_in // 32 + (1 if scales_shape_wrong else 0))
            tensors[f"{site}.{param}_blocks"] = torch.randint(
                0, 256, (e, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8
            )
            tensors[f"{site}.{param}_scales"] = torch.randint(
                117, 122, scales_shape, generator=g, dtype=torch.uint8
            )
        elif param.endswith("_bias") and ".experts." in key:
            tensors[key] = (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16)
        else:
            tensors[key] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def gpt_oss_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss_layout")
    _gpt_oss_checkpoint(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_layout_checkpoint_loads_with_transformers_logits(gpt_oss_folder, dtype):
    ours = quantplug.load(gpt_oss_folder, dtype=dtype)
    experts = ours.get_submodule(EXPERTS[0])
    assert isinstance(experts, Mxfp4Experts) and experts.gate_up_proj_bias.dtype == dtype
    with safe_open(str(gpt_oss_folder / "model.safetensors"), "pt") as f:
        assert torch.equal(experts.gate_up_proj_blocks, f.get_tensor(EXPERTS[0] + ".gate_up_proj_blocks"))
    hf = hf_load(gpt_oss_folder, dtype)
    for name in EXPERTS:  # Transformers' dequantized experts are ours, bit for bit
        theirs, mine = hf.get_submodule(name), ours.get_submodule(name)
        for e in range(mine.num_experts):
            assert torch.equal(theirs.gate_up_proj[e].t(), mine.weight("gate_up_proj", e, dtype))
            assert torch.equal(theirs.down_proj[e].t(), mine.weight("down_proj", e, dtype))
    err = rel(logits(ours), logits(hf))
    assert err < 1e-3, err  # measured: float32 7e-7 (matmul summation order), bfloat16 0


# -- (d) quantize-on-load ------------------------------------------------------------------------


def test_quantize_on_load_is_quantize(tmp_path):
    model = tiny_moe("gpt_oss")
    model.save_pretrained(tmp_path)
    loaded = quantplug.load(tmp_path, config=MXFP4)
    quantplug.quantize(model, MXFP4)
    assert isinstance(loaded.get_submodule(EXPERTS[1]), Mxfp4Experts)
    assert torch.equal(logits(loaded), logits(model))


# -- (e) refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, says",
    [
        (
            tiny_llama,
            "this model has no gpt-oss experts module (model.layers.0.mlp.gate_proj is a Linear layer)",
        ),
        (lambda: tiny_moe("qwen3_moe"), "model.layers.0.mlp.experts: mxfp4 applies to gpt-oss only"),
    ],
)
def test_non_gpt_oss_model_is_refused_before_any_change(make, says):
    model = make()
    before, kinds = logits(model), [type(m) for m in model.modules()]
    with pytest.raises(quantplug.ConfigError, match="mxfp4 applies to gpt-oss only") as err:
        quantplug.quantize(model, MXFP4)
    assert says in str(err.value) and "fp8, mxfp8 or rtn" in str(err.value)
    assert [type(m) for m in model.modules()] == kinds and not hasattr(model, "quantplug_info")
    assert torch.equal(logits(model), before)


def test_scales_of_the_wrong_shape_name_the_tensor(tmp_path):
    _gpt_oss_checkpoint(tmp_path, scales_shape_wrong=True)
    with pytest.raises(
        quantplug.CheckpointError,
        match=r"'model\.layers\.0\.mlp\.experts\.(gate_up|down)_proj_scales' has shape",
    ):
        quantplug.load(tmp_path)


def test_disk_offload_matches_a_resident_load(quantized, tmp_path):
    """``offload_refusal() is None``, as the conformance kit checks it (its Linear-layer cases do not
    apply to an experts-only format): a decoder layer on disk gives the resident load's logits."""
    pytest.importorskip("accelerate")
    _, _, _, folder = quantized
    resident = logits(quantplug.load(folder))
    offloaded = quantplug.load(
        folder, device_map={"": "cpu", "model.layers.1": "disk"}, offload_folder=tmp_path
    )
    assert offloaded.hf_device_map["model.layers.1"] == "disk"
    assert torch.equal(logits(offloaded), resident)
