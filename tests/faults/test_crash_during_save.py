"""Crashes during a save: a save that fails (disk full, Ctrl-C, a bad tensor late in the model) and a
saving process killed with SIGKILL at random points. The checkpoint at the path is always the
previous one or the new one, complete, and a half-written folder left behind is never loadable as
if it were complete.

The number of kills is 5 in CI and 60 in the long run (QUANTPLUG_FAULTS_LONG=1).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import quantplug
import quantplug.saving as saving_module
from quantplug.testing import logits
from quantplug.walk import INFO_ATTR
from quantplug_rtn.quantizer import RtnQuantizer

from ._support import record, siblings, size, tree


def quantized_llama(seed: int = 0):
    from quantplug.testing import tiny_llama
    from quantplug_rtn import RtnConfig

    model = tiny_llama(seed)
    quantplug.quantize(model, RtnConfig(bits=4), progress=False)
    return model


# -- atomic save ------------------------------------------------------------------------------------


def _fail_on_second_write(exc: BaseException):
    def arrange(monkeypatch, model):
        real = saving_module.write_file
        calls = []

        def flaky(path, tensors, metadata=None):
            calls.append(Path(path).name)
            if len(calls) == 2:
                raise exc
            return real(path, tensors, metadata)

        monkeypatch.setattr(saving_module, "write_file", flaky)
        # the first shard was written before the failure
        return lambda: len(calls) == 2 and calls[0].startswith("model-00001-of-")

    return arrange


def _subclass_in_last_module(monkeypatch, model):
    class Wrapped(torch.Tensor):
        pass

    last = getattr(model, INFO_ATTR).modules[-1]
    real = RtnQuantizer.module_tensors

    def module_tensors(self, name, qmodule):
        out = real(self, name, qmodule)
        if name == last:
            out["qweight"] = out["qweight"].as_subclass(Wrapped)
        return out

    monkeypatch.setattr(RtnQuantizer, "module_tensors", module_tensors)
    return lambda: True


def _meta_parameter(monkeypatch, model):
    model.model.norm.weight = nn.Parameter(torch.empty(128, device="meta"))
    return lambda: True


@pytest.mark.parametrize(
    ("arrange", "error"),
    [
        pytest.param(_fail_on_second_write(OSError(28, "No space left on device")), OSError, id="disk-full"),
        pytest.param(_fail_on_second_write(KeyboardInterrupt()), KeyboardInterrupt, id="interrupted"),
        pytest.param(_subclass_in_last_module, quantplug.CheckpointError, id="bad-tensor-late"),
        pytest.param(_meta_parameter, quantplug.CheckpointError, id="meta-parameter"),
    ],
)
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, rtn_checkpoint, arrange, error, monkeypatch):
    _, ids, out = rtn_checkpoint
    path = quantplug.save(quantized_llama(), tmp_path / "ckpt")
    (path / "README.md").write_text("keep me")
    before = tree(path)
    new = quantized_llama(seed=1)
    assert not torch.equal(logits(new, ids), out)
    got_midway = arrange(monkeypatch, new)
    with pytest.raises(error):
        quantplug.save(new, path, max_shard_size="50KB")
    assert got_midway()
    assert tree(path) == before
    assert siblings(path) == ["ckpt"]  # no temporary folder left beside it
    monkeypatch.undo()
    assert torch.equal(logits(quantplug.load(path, progress=False), ids), out)


def test_first_save_that_fails_leaves_nothing(tmp_path, monkeypatch):
    model = quantized_llama()
    _fail_on_second_write(OSError("boom"))(monkeypatch, model)
    with pytest.raises(OSError, match="boom"):
        quantplug.save(model, tmp_path / "ckpt", max_shard_size="50KB")
    assert list(tmp_path.iterdir()) == []


CRASH_SERVER = textwrap.dedent(
    """
    import ctypes, os, signal, sys, traceback
    import torch
    from safetensors.torch import load_file
    from torch import nn
    import quantplug, quantplug.saving

    torch.set_num_threads(1)  # no OpenMP threads: forking below is safe

    def mlp():
        return nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])

    models = []
    for source in sys.argv[1:3]:
        m = mlp()
        m.load_state_dict(load_file(source))
        models.append(m)
    print("ready", flush=True)
    for _ in sys.stdin:  # one line per saver to start
        pid = os.fork()
        if pid == 0:  # the saver: save the two models in turn until killed
            try:
                ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the helper
                i = 0
                while True:
                    quantplug.save(models[i % 2], sys.argv[3], max_shard_size="1500KB")
                    i += 1
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(3)
        print(pid, flush=True)
        print(os.waitpid(pid, 0)[1], flush=True)
    """
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_save_removes_a_killed_saves_temp_folders_but_not_a_live_ones(tmp_path):
    model = _big_mlp(0)
    path = quantplug.save(model, tmp_path / "ckpt", max_shard_size="1500KB")
    dead = _dead_pid()
    stale = [
        tmp_path / f".ckpt.quantplug-tmp-{dead}-0badc0de",
        tmp_path / f".ckpt.quantplug-old-{dead}-0badc0de",
    ]
    live_saver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".ckpt.quantplug-tmp-{live_saver.pid}-0badc0de"  # a concurrent save, mid-write
        legacy = tmp_path / ".ckpt.quantplug-old-0badc0de"  # no pid in its name: cannot tell, kept
        other = (
            tmp_path / f".other.quantplug-tmp-{dead}-0badc0de"
        )  # another target's: not this save's business
        for folder in (*stale, live, legacy, other):
            folder.mkdir()
            (folder / "model-00001-of-00008.safetensors").write_bytes(b"half")
        quantplug.save(model, path, max_shard_size="1500KB")
        assert siblings(path) == sorted(["ckpt", live.name, legacy.name, other.name])
    finally:
        live_saver.kill()
        live_saver.wait()


def _big_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]).eval()


KILLS = size(5, 60)


def _leftovers(parent: Path) -> list[Path]:
    """Temporary folders a killed save left beside the checkpoint."""
    return sorted(p for p in parent.iterdir() if ".quantplug-" in p.name)


def test_sigkill_during_save_leaves_the_old_or_the_new_checkpoint(tmp_path, subprocess_env):
    """A child process saves two ~8 MB models (8 shards) in turn, over and over, and is SIGKILLed
    after a random short delay, KILLS times; whenever it died, the path holds one complete checkpoint,
    and every half-written folder it left behind refuses to load (one that is complete may load, and
    then it is exactly one of the two models).

    The savers are forked from one helper interpreter (``sys.executable``), so torch is imported once.
    """
    a, b = _big_mlp(0), _big_mlp(1)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        refs = {"a": a(x), "b": b(x)}
    assert not torch.equal(refs["a"], refs["b"])
    save_file(a.state_dict(), tmp_path / "a.safetensors")
    save_file(b.state_dict(), tmp_path / "b.safetensors")
    ckpt = tmp_path / "out" / "ckpt"
    quantplug.save(a, ckpt, max_shard_size="1500KB")
    assert len(list(ckpt.glob("model-*.safetensors"))) == 8

    rng = random.Random(20240607)
    stderr = tmp_path / "helper.stderr"
    with open(stderr, "w") as err:
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CRASH_SERVER,
                tmp_path / "b.safetensors",
                tmp_path / "a.safetensors",
                ckpt,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=subprocess_env(OMP_NUM_THREADS="1"),
        )
    # a hung helper fails the test instead of hanging it
    watchdog = threading.Timer(120 + 10 * KILLS, server.kill)
    watchdog.start()

    def line() -> str:
        text = server.stdout.readline()
        if not text:
            server.kill()
            server.wait(timeout=30)
            pytest.fail(f"the helper process died:\n{stderr.read_text()[-3000:]}")
        return text.strip()

    seen, pid = [], None
    half_written_refused = complete_leftovers = 0
    try:
        assert line() == "ready"
        for kill in range(KILLS):
            server.stdin.write("go\n")
            server.stdin.flush()
            pid = int(line())
            time.sleep(rng.uniform(0.02, 0.6))
            os.kill(pid, signal.SIGKILL)
            status = int(line())
            pid = None
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, stderr.read_text()[
                -3000:
            ]

            model = quantplug.load(ckpt, model=_big_mlp(99), progress=False)
            with torch.no_grad():
                out = model(x)
            which = [k for k, ref in refs.items() if torch.equal(out, ref)]
            assert len(which) == 1, "the checkpoint is neither the old nor the new model"
            seen.append(which[0])
            assert not [p.name for p in ckpt.iterdir() if "quantplug" in p.name]

            for left in _leftovers(ckpt.parent):
                try:
                    partial = quantplug.load(left, model=_big_mlp(99), progress=False)
                except quantplug.CheckpointError as exc:
                    assert left.name in str(exc) or "model-0000" in str(exc), str(exc)
                    half_written_refused += 1
                else:  # all of it was written before the kill: it must be exactly one of the two
                    with torch.no_grad():
                        got = partial(x)
                    assert any(torch.equal(got, ref) for ref in refs.values()), f"{left.name} loads wrong"
                    complete_leftovers += 1
                if kill < KILLS - 1:  # the last kill's are left for the save below to remove
                    shutil.rmtree(left)
    finally:
        watchdog.cancel()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if server.poll() is None:
            server.kill()
        server.wait(timeout=30)
        server.stdin.close()
        server.stdout.close()
    assert len(seen) == KILLS
    leftovers = len(_leftovers(ckpt.parent))
    quantplug.save(a, ckpt, max_shard_size="1500KB")  # the killed savers' pids no longer exist
    assert _leftovers(ckpt.parent) == []
    record(
        "sigkill-during-save",
        kills=KILLS,
        loads_ok=len(seen),
        found_model_a=seen.count("a"),
        found_model_b=seen.count("b"),
        half_written_leftovers_refused=half_written_refused,
        complete_leftovers=complete_leftovers,
        last_kill_leftovers_removed_by_next_save=leftovers,
    )
