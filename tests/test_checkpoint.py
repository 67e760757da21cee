"""Checkpoints: ``quantplug.save`` / ``quantplug.load``, the ``Checkpoint`` index, our streaming
safetensors reader and writer, carry-over of foreign files, and quantize-on-load
(``load(path, config=...)``). Corrupt and hostile checkpoints, failed and killed saves and the
no-unpickling guarantee are in the fault suite, tests/faults/.

Everything runs on tiny random-weight models built locally with the reference plugin ``rtn``.
What the conformance kit (``quantplug.testing``) already checks per backend is not repeated here.
"""

from __future__ import annotations

import json
import struct
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from faults._support import read_all, rewrite, siblings, tree
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import quantplug
import quantplug.saving as saving_module
from quantplug.checkpoint import Checkpoint
from quantplug.safetensors_io import CHECKSUMS_KEY, SafetensorsFile, write_file
from quantplug.testing import logits, tiny_llama, token_ids
from quantplug.walk import INFO_ATTR
from quantplug_rtn import RtnConfig
from quantplug_rtn.quantizer import RtnLinear

WEIGHTS = "model.safetensors"


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def quantized_llama(seed: int = 0, config: RtnConfig | None = None, **overrides):
    model = tiny_llama(seed, **overrides)
    quantplug.quantize(model, config or RtnConfig(bits=4), progress=False)
    return model


# -- round trips ------------------------------------------------------------------------------------


def test_rtn_round_trip_is_exact_with_full_records(rtn_checkpoint, capfd):
    folder, ids, out = rtn_checkpoint
    capfd.readouterr()
    loaded = quantplug.load(folder)  # progress=True: no bar on a non-TTY
    assert capfd.readouterr() == ("", "")
    assert (logits(loaded, ids) - out).abs().max().item() == 0.0
    assert isinstance(loaded.model.layers[1].mlp.down_proj, RtnLinear)
    assert type(loaded.lm_head) is nn.Linear
    assert not loaded.training
    info = getattr(loaded, INFO_ATTR)
    assert info.config == RtnConfig(bits=4) and len(info.modules) == 14

    names = sorted(p.name for p in folder.iterdir())
    assert all(p.is_file() for p in folder.iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    assert "config.json" in names and WEIGHTS in names

    with safe_open(folder / WEIGHTS, "pt") as f:
        meta = f.metadata()
    assert meta["quantplug_version"] == quantplug.__version__
    assert meta["quant_method"] == "rtn"
    assert meta["plugin"] == "quantplug-rtn"
    assert meta["plugin_version"] == version("quantplug-rtn")

    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == RtnConfig(bits=4).to_dict()
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_full_precision_round_trip_is_identical(tmp_path):
    model = tiny_llama(seed=3)
    ids = token_ids()
    path = quantplug.save(model, tmp_path / "fp")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(path / WEIGHTS, "pt") as f:
        assert "quant_method" not in f.metadata()
    loaded = quantplug.load(path, progress=False)
    assert getattr(loaded, INFO_ATTR, None) is None
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    original = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == original.keys()
    assert all(torch.equal(got[k], original[k]) and got[k].dtype == original[k].dtype for k in got)
    # full precision can still be quantized after loading
    assert quantplug.quantize(loaded, RtnConfig(bits=8), progress=False).converted


def test_tied_checkpoint_stores_the_embedding_once_and_stays_tied(tmp_path):
    model = quantized_llama(tie_word_embeddings=True)
    ids = token_ids()
    path = quantplug.save(model, tmp_path / "tied")
    with safe_open(path / WEIGHTS, "pt") as f:
        stored = list(f.keys())
        assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
        assert json.loads(f.metadata()["quantplug_aliases"]) == {
            "lm_head.weight": "model.embed_tokens.weight"
        }
    loaded = quantplug.load(path, progress=False)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_a_loaded_quantized_model_cannot_be_quantized_again(rtn_checkpoint):
    loaded = quantplug.load(rtn_checkpoint[0], progress=False)
    with pytest.raises(quantplug.ConfigError, match="already quantized"):
        quantplug.quantize(loaded, RtnConfig(bits=8), progress=False)


def test_non_transformers_checkpoint_needs_model(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    quantplug.quantize(model, RtnConfig(bits=8), progress=False)
    path = quantplug.save(model, tmp_path / "mlp")
    config = json.loads((path / "config.json").read_text())
    assert config["quantplug_model_class"] == "torch.nn.modules.container.Sequential"
    with pytest.raises(quantplug.CheckpointError, match="pass model="):
        quantplug.load(path, progress=False)


# -- sharding and the Checkpoint index ----------------------------------------------------------------


def test_sharded_save_loads_identically(tmp_path, rtn_checkpoint):
    _, ids, out = rtn_checkpoint
    model = quantized_llama()
    path = quantplug.save(model, tmp_path / "sharded", max_shard_size="50KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (path / WEIGHTS).exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards

    stored = {}
    for shard in shards:
        with safe_open(path / shard, "pt") as f:
            assert f.metadata()["quant_method"] == "rtn"
            stored.update(dict.fromkeys(f.keys(), shard))
        tensors = load_file(path / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 50_000 or len(tensors) == 1, shard  # only a tensor over the limit stands alone
    assert stored == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(path / s).values()
    )

    ckpt = Checkpoint(path)
    assert ckpt.keys() == set(stored)
    key = "model.layers.1.mlp.up_proj.qweight"
    assert torch.equal(ckpt.read(key), load_file(path / stored[key])[key])
    assert ckpt.spec(key) == (tuple(model.model.layers[1].mlp.up_proj.qweight.shape), torch.uint8)

    loaded = quantplug.load(path, progress=False)
    assert torch.equal(logits(loaded, ids), out)


def test_resaving_sharded_as_single_file_drops_the_old_shards(tmp_path, rtn_checkpoint):
    _, ids, out = rtn_checkpoint
    path = quantplug.save(quantized_llama(seed=5), tmp_path / "ckpt", max_shard_size="50KB")
    quantplug.save(quantized_llama(), path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", WEIGHTS]
    assert torch.equal(logits(quantplug.load(path, progress=False), ids), out)


def _drop_first_shard(path: Path) -> str:
    first = sorted(path.glob("model-*.safetensors"))[0]
    first.unlink()
    return first.name


def _point_index_outside(path: Path) -> str:
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../evil.safetensors"
    index.write_text(json.dumps(data))
    return "../evil.safetensors"


def _misfile_a_tensor(path: Path) -> str:
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    key = next(k for k, v in data["weight_map"].items() if v == shards[0])
    data["weight_map"][key] = shards[1]
    index.write_text(json.dumps(data))
    return key


def _unindexed_tensor(path: Path) -> str:
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    return key


def _duplicate_tensor(path: Path) -> str:
    shards = sorted(path.glob("model-*.safetensors"))
    key, value = next(iter(read_all(shards[0]).items()))
    rewrite(shards[1], lambda t: t.__setitem__(key, value))
    return key


def _index_not_json(path: Path) -> str:
    (path / "model.safetensors.index.json").write_text("{not json")
    return "model.safetensors.index.json"


@pytest.mark.parametrize(
    "damage",
    [
        _drop_first_shard,
        _point_index_outside,
        _misfile_a_tensor,
        _unindexed_tensor,
        _duplicate_tensor,
        _index_not_json,
    ],
)
def test_inconsistent_sharded_checkpoints_are_refused(tmp_path, damage):
    path = quantplug.save(quantized_llama(), tmp_path / "ckpt", max_shard_size="50KB")
    named = damage(path)
    with pytest.raises(quantplug.CheckpointError) as err:
        quantplug.load(path, progress=False)
    assert named in str(err.value)


# -- our safetensors reader and writer ----------------------------------------------------------------


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    size = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (works for every dtype, NaN payloads included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
        )
    )


INTEROP_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _interop_tensors() -> dict[str, torch.Tensor]:
    tensors = {
        f"t.{str(dt).split('.')[1]}": _random_tensor(dt, (3, 5), i) for i, dt in enumerate(INTEROP_DTYPES)
    }
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.empty(0, 7)
    tensors["big"] = torch.randn(64, 33, generator=torch.Generator().manual_seed(9))
    tensors["unicode.ünï"] = torch.arange(4, dtype=torch.int32)
    return tensors


def test_our_writer_is_read_by_safetensors(tmp_path):
    tensors = _interop_tensors()
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    ours = {**tensors, "transposed": base.t(), "offset_slice": base[3:5]}  # not contiguous / not at 0
    meta = {"quantplug_version": "x", "note": 'ünïcode, "quotes"'}
    path = tmp_path / "ours.safetensors"
    nbytes = write_file(path, list(ours.items()), meta)
    assert nbytes == sum(t.numel() * t.element_size() for t in ours.values())
    assert SafetensorsFile(path).data_start % 8 == 0
    with safe_open(path, "pt") as f:
        written = f.metadata()
    checksums = json.loads(written.pop(CHECKSUMS_KEY))  # ours, one per tensor, checked on read
    assert written == meta and set(checksums) == set(ours)
    got = load_file(path)
    assert got.keys() == ours.keys()
    for key, t in ours.items():
        assert _same(got[key], t.contiguous()), key


def test_safetensors_files_are_read_by_our_reader(tmp_path):
    tensors = _interop_tensors()
    meta = {"format": "pt", "a": "b"}
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, path, metadata=meta)
    f = SafetensorsFile(path)
    assert f.metadata == meta
    assert set(f.keys()) == set(tensors)
    for key, t in tensors.items():
        assert _same(f.read(key), t), key
    save_file({"x": torch.ones(2)}, tmp_path / "nometa.safetensors")
    assert SafetensorsFile(tmp_path / "nometa.safetensors").metadata == {}


def _raw(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", "too short", id="empty"),
        pytest.param(b"\x10\x00\x00", "too short", id="short-length"),
        pytest.param(struct.pack("<Q", 10**6) + b"{}", "does not fit", id="length-past-end"),
        pytest.param(struct.pack("<Q", 2**62) + b"{}" * 8, "does not fit", id="huge-length"),
        pytest.param(_raw(b"\xff\xfe garbage !!"), "not valid JSON", id="garbage-header"),
        pytest.param(_raw(b'{"a": '), "not valid JSON", id="cut-json"),
        pytest.param(_raw([1, 2]), "not a JSON object", id="header-list"),
        pytest.param(_raw({"__metadata__": [1]}), "__metadata__", id="metadata-list"),
        pytest.param(
            _raw({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "'w'", id="dtype"
        ),
        pytest.param(_raw({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)), "'w'", id="no-offsets"),
        pytest.param(_raw({"w": "F32"}, bytes(8)), "'w'", id="entry-string"),
        pytest.param(
            _raw({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)), "'w'", id="neg"
        ),
        pytest.param(
            _raw({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8)), "'w'", id="flt"
        ),
        pytest.param(
            _raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), "'w'", id="size"
        ),
        pytest.param(_raw({"w": GOOD_ENTRY}, bytes(4)), "truncated", id="data-cut"),
        pytest.param(_raw({"w": {**GOOD_ENTRY, "data_offsets": [8, 0]}}, bytes(8)), "'w'", id="reversed"),
        pytest.param(
            _raw({"w": GOOD_ENTRY, "v": {**GOOD_ENTRY, "data_offsets": [4, 12]}}, bytes(12)),
            "overlap",
            id="overlap",
        ),
    ],
)
def test_our_reader_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(quantplug.CheckpointError) as err:
        SafetensorsFile(path)
    assert message in str(err.value)
    assert "bad.safetensors" in str(err.value)


def test_our_writer_refuses_what_safetensors_cannot_hold(tmp_path):
    with pytest.raises(quantplug.CheckpointError, match="'c'.*complex"):
        write_file(tmp_path / "x.safetensors", [("c", torch.zeros(2, dtype=torch.complex64))])

    class Wrapped(torch.Tensor):
        pass

    with pytest.raises(quantplug.CheckpointError, match="'w'.*subclass"):
        write_file(tmp_path / "y.safetensors", [("w", torch.zeros(2).as_subclass(Wrapped))])


# -- where a save goes --------------------------------------------------------------------------------


def test_resave_keeps_foreign_files(tmp_path, rtn_checkpoint):
    _, ids, out = rtn_checkpoint
    path = quantplug.save(tiny_llama(seed=7), tmp_path / "ckpt")
    (path / "tokenizer.json").write_text('{"model": "bpe"}')
    (path / "README.md").write_text("# my model\n")
    (path / "extras" / "deep").mkdir(parents=True)
    (path / "extras" / "deep" / "notes.txt").write_text("notes")
    (path / "adapter_model.safetensors").write_bytes(b"not ours")
    own = {"config.json", "generation_config.json", WEIGHTS}
    foreign = {k: v for k, v in tree(path).items() if k not in own}
    assert len(foreign) == 4

    quantplug.save(quantized_llama(), path)

    after = tree(path)
    assert {k: after.get(k) for k in foreign} == foreign
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "rtn"
    assert torch.equal(logits(quantplug.load(path, progress=False), ids), out)
    assert siblings(path) == ["ckpt"]


def test_resave_without_atomic_exchange_keeps_foreign_files(tmp_path, rtn_checkpoint, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is unavailable, the two-rename fallback gives the same result."""
    _, ids, out = rtn_checkpoint
    monkeypatch.setattr(saving_module, "_rename_exchange", lambda a, b: False)
    path = quantplug.save(tiny_llama(seed=7), tmp_path / "ckpt")
    (path / "tokenizer.json").write_text("{}")
    quantplug.save(quantized_llama(), path)
    assert (path / "tokenizer.json").read_text() == "{}"
    assert torch.equal(logits(quantplug.load(path, progress=False), ids), out)
    assert siblings(path) == ["ckpt"]


def test_extra_files_join_the_atomic_save(tmp_path, rtn_checkpoint):
    _, ids, out = rtn_checkpoint
    path = quantplug.save(tiny_llama(seed=7), tmp_path / "out" / "ckpt")
    (path / "tokenizer.json").write_text("old")
    (path / "README.md").write_text("kept")
    source = tmp_path / "src"
    source.mkdir()
    (source / "tokenizer.json").write_text("new")
    (source / "special_tokens_map.json").write_text("{}")

    quantplug.save(
        quantized_llama(), path, extra_files=[source / "tokenizer.json", source / "special_tokens_map.json"]
    )
    assert (path / "tokenizer.json").read_text() == "new"  # the file given wins over the old copy
    assert (path / "special_tokens_map.json").read_text() == "{}"
    assert (path / "README.md").read_text() == "kept"
    assert torch.equal(logits(quantplug.load(path, progress=False), ids), out)

    before = tree(path)
    (source / "config.json").write_text("{}")
    with pytest.raises(quantplug.CheckpointError, match="config.json"):
        quantplug.save(tiny_llama(seed=8), path, extra_files=[source / "config.json"])
    assert tree(path) == before
    assert siblings(path) == ["ckpt"]


def test_saving_onto_a_regular_file_is_refused(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    with pytest.raises(quantplug.CheckpointError, match="not a folder"):
        quantplug.save(quantized_llama(), target)
    assert target.read_bytes() == b"precious"
    assert siblings(target) == ["model.bin"]


def test_saving_through_a_symlink(tmp_path, rtn_checkpoint):
    _, ids, out = rtn_checkpoint
    real = quantplug.save(tiny_llama(seed=7), tmp_path / "runs" / "step-100")
    old = logits(quantplug.load(real, progress=False), ids)
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    try:
        quantplug.save(quantized_llama(), link)
    except quantplug.CheckpointError:  # refusing up front would be fine too
        assert link.is_symlink()
        assert torch.equal(logits(quantplug.load(link, progress=False), ids), old)
    else:
        assert link.is_symlink(), "the link was replaced by a folder"
        assert torch.equal(logits(quantplug.load(link, progress=False), ids), out)
    assert siblings(link) == ["latest", "runs"]
    assert siblings(real) == ["step-100"]


# -- quantize-on-load -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: tiny_llama(seed=2), id="llama-float32"),
        pytest.param(lambda: tiny_llama(seed=2).to(torch.bfloat16), id="llama-bfloat16"),
        pytest.param(lambda: tiny_llama(seed=2, tie_word_embeddings=True), id="llama-tied"),
        pytest.param(lambda: tiny_gpt2(seed=2), id="gpt2-conv1d"),
    ],
)
@pytest.mark.parametrize(
    "config",
    [
        RtnConfig(bits=4),
        RtnConfig(bits=8, group_size=-1, symmetric=False, modules_to_not_convert=["mlp", "lm_head"]),
    ],
    ids=["int4", "int8-asym-skip-mlp"],
)
def test_quantize_on_load_equals_load_then_quantize(tmp_path, make, config):
    model = make()
    ids = token_ids(vocab=model.config.vocab_size)
    fp = quantplug.save(model, tmp_path / "fp")

    reference = quantplug.load(fp, progress=False)
    report = quantplug.quantize(reference, config, progress=False)
    on_load = quantplug.load(fp, config=config, progress=False)

    assert getattr(on_load, INFO_ATTR).modules == report.converted
    assert getattr(on_load, INFO_ATTR).config == config
    assert {n: type(m) for n, m in on_load.named_modules()} == {
        n: type(m) for n, m in reference.named_modules()
    }
    assert on_load.dtype == reference.dtype
    assert torch.equal(logits(on_load, ids), logits(reference, ids))

    # and it saves as a pre-quantized checkpoint like any quantized model
    again = quantplug.load(quantplug.save(on_load, tmp_path / "q"), progress=False)
    assert torch.equal(logits(again, ids), logits(reference, ids))


def test_quantize_on_load_accepts_a_config_dict(tmp_path):
    fp = quantplug.save(tiny_llama(), tmp_path / "fp")
    model = quantplug.load(fp, config={"quant_method": "rtn", "bits": 2, "group_size": 32}, progress=False)
    assert model.model.layers[0].self_attn.q_proj.bits == 2
    assert getattr(model, INFO_ATTR).config == RtnConfig(bits=2, group_size=32)


def test_quantize_on_load_of_a_tied_head(tmp_path):
    fp = quantplug.save(tiny_llama(seed=2, tie_word_embeddings=True), tmp_path / "fp")
    ids = token_ids()
    config = RtnConfig(bits=4, modules_to_not_convert=[])
    reference = quantplug.load(fp, progress=False)
    assert "lm_head" in quantplug.quantize(reference, config, progress=False).converted
    on_load = quantplug.load(fp, config=config, progress=False)
    assert torch.equal(logits(on_load, ids), logits(reference, ids))


def test_quantize_on_load_of_a_quantized_checkpoint_is_refused(rtn_checkpoint):
    with pytest.raises(quantplug.AlreadyQuantizedError, match="already quantized") as err:
        quantplug.load(rtn_checkpoint[0], config=RtnConfig(bits=8), progress=False)
    assert err.value.value == "rtn"


def test_quantize_on_load_refuses_an_unsupported_device_before_reading(rtn_checkpoint, tmp_path, monkeypatch):
    fp = quantplug.save(tiny_llama(), tmp_path / "fp")

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(SafetensorsFile, "read", no_reading)
    with pytest.raises(quantplug.BackendUnavailableError, match="does not run on 'xpu'"):
        quantplug.load(fp, config=RtnConfig(), device="xpu", progress=False)
    with pytest.raises(quantplug.BackendUnavailableError, match="does not run on 'xpu'"):
        quantplug.load(rtn_checkpoint[0], device="xpu", progress=False)


# -- dtypes -----------------------------------------------------------------------------------------


def test_bfloat16_full_precision_checkpoint_loads_as_bfloat16(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    path = quantplug.save(model, tmp_path / "bf16")
    assert {t.dtype for t in load_file(path / WEIGHTS).values()} == {torch.bfloat16}
    loaded = quantplug.load(path, progress=False)
    assert loaded.dtype == torch.bfloat16
    original = model.state_dict()
    assert all(
        torch.equal(t, original[k]) and t.dtype == original[k].dtype for k, t in loaded.state_dict().items()
    )


def test_bfloat16_quantized_checkpoint_loads(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    quantplug.quantize(model, RtnConfig(bits=4), progress=False)
    path = quantplug.save(model, tmp_path / "bf16-q")
    ids = token_ids()
    workaround = quantplug.load(path, dtype=torch.bfloat16, progress=False)  # works when told
    loaded = quantplug.load(path, progress=False)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(logits(loaded, ids), logits(workaround, ids))


def test_backend_header_metadata_is_written_and_validated(tmp_path, monkeypatch):
    model = quantized_llama()
    quantizer = model.quantplug_info.quantizer
    seen, names = {}, []

    def checkpoint_metadata(modules, stored):
        seen.update(modules)
        names.extend(stored)
        return {"mybackend.layers": json.dumps(sorted(modules))}

    monkeypatch.setattr(quantizer, "checkpoint_metadata", checkpoint_metadata)
    ckpt = quantplug.save(model, tmp_path / "ckpt")
    assert sorted(seen) == sorted(model.quantplug_info.modules)
    with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mybackend.layers"]) == sorted(seen)
    with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
        assert sorted(names) == sorted(f.keys())  # every stored tensor, named
    assert meta["quant_method"] == "rtn"  # the core's own entries stay
    assert torch.equal(logits(quantplug.load(ckpt, progress=False), token_ids()), logits(model, token_ids()))

    monkeypatch.setattr(quantizer, "checkpoint_metadata", lambda modules, stored: {"quant_method": "other"})
    with pytest.raises(quantplug.PluginError, match="clash"):
        quantplug.save(model, tmp_path / "clash")
    assert not (tmp_path / "clash").exists()


def test_load_shows_progress_on_a_tty(monkeypatch, rtn_checkpoint, tmp_path):
    """Layers rebuilt through the walk, and the other tensors (all of them in a plain load)."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    plain = quantplug.save(tiny_llama(), tmp_path / "plain")
    for folder, bars in ((rtn_checkpoint[0], ("loading", "loading tensors")), (plain, ("loading tensors",))):
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        quantplug.load(folder, progress=True)
        for bar in bars:
            assert f"{bar}:" in term.getvalue(), (folder, term.getvalue()[-300:])
        quiet = Terminal()
        monkeypatch.setattr(sys, "stderr", quiet)
        quantplug.load(folder, progress=False)
        assert quiet.getvalue() == ""
