"""Larger than memory: rows on disk, the disk store, O(model) checkpoints and exact resume
after a crash at any point (mid-pass, mid-checkpoint, mid-output, and a real SIGKILL)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import demo_subset, protect_killed_after_checkpoint

import ue_fast
from ue_fast.data import load_delta_npy, read_image_folder
from ue_fast.generation.rowfile import RowFile
from ue_fast.generation.store import PerturbationStore, parse_size

CPU = torch.device("cpu")
SHORT = dict(arch="cnn-small", epochs=2, pgd_steps=2, batch_size=16, poison_batch_size=32, progress=False,
             device="cpu")


# ----------------------------------------------------------------------------- rows on disk
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float16, torch.float32])
def test_rowfile_reads_and_writes_rows_in_any_order(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    ref = (torch.rand(37, 3, 4, 5, generator=g) * 100).to(dtype)
    f = RowFile.create(tmp_path / "a.npy", ref.shape, dtype)
    assert torch.equal(f.read_range(0, 37), torch.zeros_like(ref))  # a new file is zeros
    for rows in (torch.randperm(37, generator=g)[:20], torch.arange(5, 30), torch.tensor([36, 0, 1, 2, 35])):
        f.write(rows, ref[rows])
    f.write(torch.arange(37), ref)
    for rows in (torch.randperm(37, generator=g), torch.tensor([3]), torch.arange(10, 20), torch.tensor([], dtype=torch.int64)):
        assert torch.equal(f.read(rows), ref[rows])
    f.sync()
    assert np.array_equal(np.load(tmp_path / "a.npy"), ref.numpy())  # a plain .npy
    with pytest.raises(IndexError):
        f.read(torch.tensor([37]))
    with pytest.raises(ValueError, match="read-only"):
        RowFile(tmp_path / "a.npy").write(torch.tensor([0]), ref[:1])


def test_parse_size():
    assert parse_size("500M") == 500 << 20
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("2gib") == 2 << 30
    assert parse_size(12345) == 12345
    for bad in ("", "lots", "-1G", "0", True):
        with pytest.raises(ValueError):
            parse_size(bad)


# ----------------------------------------------------------------------------- the disk store
def _disk(tmp_path, rows=6, dtype=torch.float32):
    return PerturbationStore(rows, (3, 2, 2), device=CPU, place="disk", dtype=dtype, eps=8 / 255, seed=0,
                             work_dir=tmp_path)


def test_disk_store_alternates_files_and_a_crash_keeps_the_named_one(tmp_path):
    s = _disk(tmp_path)
    v = torch.full((6, 3, 2, 2), 1 / 255)
    s.begin_pass()
    s.put(torch.arange(6), v)
    state = s.state_dict()  # ends the step: file 1 is complete
    assert state == {"file": 1, "passes": 1} and torch.equal(s.get(torch.arange(6)), v)
    s.begin_pass()  # the next step writes file 0, a copy of file 1
    s.put(torch.tensor([0, 1]), 2 * v[:2])
    assert torch.equal(s.get(torch.arange(2)), 2 * v[:2])
    # A crash now: a new store resumed from the last checkpoint sees file 1, untouched.
    t = _disk(tmp_path)
    t.load_state_dict(state)
    assert torch.equal(t.get(torch.arange(6)), v) and t.passes == 1
    with pytest.raises(ValueError, match="missing"):
        _disk(tmp_path / "elsewhere").load_state_dict(state)
    with pytest.raises(RuntimeError, match="begin_pass"):
        t.put(torch.tensor([0]), v[:1])


def test_disk_store_matches_the_memory_store_in_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16, torch.int8):
        mem = PerturbationStore(6, (3, 2, 2), device=CPU, place=CPU, dtype=dtype, eps=8 / 255, seed=0)
        disk = _disk(tmp_path / str(dtype), dtype=dtype)
        for _ in range(3):
            v = (torch.rand(6, 3, 2, 2, generator=g) * 2 - 1) * 8 / 255
            rows = torch.randperm(6, generator=g)[:4]
            for s in (mem, disk):
                s.begin_pass()
                s.put(rows, v[rows])
                s.state_dict()
        assert torch.equal(mem.get(torch.arange(6)), disk.get(torch.arange(6))), dtype
        assert torch.equal(mem.read_samples(1, 5), disk.read_samples(1, 5))


# ----------------------------------------------------------------------------- protect on disk
@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("in"), per_class=12)


def _same_outputs(a: Path, b: Path) -> None:
    assert (a / "poison.pt").read_bytes() == (b / "poison.pt").read_bytes()
    ma, mb = (ue_fast.data.read_json(x / "manifest.json") for x in (a, b))
    assert ma["perturbation_npy"] == mb["perturbation_npy"]
    assert torch.equal(load_delta_npy(a / ma["perturbation_npy"]), load_delta_npy(b / mb["perturbation_npy"]))
    assert torch.equal(read_image_folder(a, progress=False).images, read_image_folder(b, progress=False).images)


@pytest.mark.parametrize("method,settings", [
    ("miue", {}),
    ("em-classwise", dict(train_steps=2)),  # images on disk, the class rows in memory
    ("ap", dict(pretrain_epochs=1, epochs=1, restarts=2)),  # the best restart is a second disk store
    ("miue", dict(delta_dtype="int8", alpha=2 / 255)),
])
def test_disk_store_gives_the_memory_result_bit_for_bit(tmp_path, src, method, settings):
    kw = dict(SHORT, method=method, **settings)
    ue_fast.protect(src, tmp_path / "mem", store="memory", **kw)
    m = ue_fast.protect(src, tmp_path / "disk", store="disk", keep_checkpoint=True, checkpoint_every=0, **kw)
    assert m["delta_store"]["images_on"] == "disk"
    assert m["delta_store"]["on"] == ("cpu" if method == "em-classwise" else "disk")
    _same_outputs(tmp_path / "mem", tmp_path / "disk")
    # The checkpoint holds the model and the run's state, not the perturbations.
    ckpt = tmp_path / "disk" / ".ue_fast" / "checkpoint.pt"
    delta_bytes = 36 * 3 * 32 * 32 * 4
    if method != "em-classwise":
        assert ckpt.stat().st_size < delta_bytes + 4_000_000  # the surrogate and its momentum: ~2 MB
        state = torch.load(ckpt, weights_only=True)["state"]["store"]
        assert "delta" not in state and state["file"] in (0, 1)


def test_auto_goes_to_disk_over_the_memory_budget(tmp_path, src):
    m = ue_fast.protect(src, tmp_path / "o", memory_budget="100K", **SHORT)
    assert m["delta_store"]["on"] == "disk" and m["delta_store"]["images_on"] == "disk"
    # poison.pt (36 x 12 KiB of float32) would exceed the budget too: the manifest says so
    assert not (tmp_path / "o" / "poison.pt").exists()
    assert m["outputs"]["poison.pt"]["written"] is False
    assert "memory budget" in m["outputs"]["poison.pt"]["why"]
    npy = np.load(tmp_path / "o" / "perturbation_int8.npy", mmap_mode="r")
    assert npy.shape == (36, 3, 32, 32) and np.abs(npy).max() <= 8
    m2 = ue_fast.protect(src, tmp_path / "o2", store="memory", **SHORT)
    assert torch.equal(load_delta_npy(tmp_path / "o" / "perturbation_int8.npy"),
                       load_delta_npy(tmp_path / "o2" / "perturbation_int8.npy"))
    assert m2["outputs"]["poison.pt"]["written"] is True


@pytest.mark.parametrize("method,kw,why", [
    ("bayes", {}, "whole set"),
    ("miue", dict(sparse=10), "saliency"),
])
def test_methods_that_need_memory_refuse_the_disk_clearly(tmp_path, src, method, kw, why):
    with pytest.raises(ValueError, match=f"(?s){why}.*--store memory"):
        ue_fast.protect(src, tmp_path / "o", method=method, store="disk", device="cpu", progress=False, **kw)


# ----------------------------------------------------------------------------- crashes
def _interrupted(monkeypatch, target, attr, after: int):
    """Patch ``target.attr`` to raise KeyboardInterrupt on its ``after``-th call."""
    real = getattr(target, attr)
    calls = 0

    def dying(*a, **k):
        nonlocal calls
        calls += 1
        if calls == after:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(target, attr, dying)


@pytest.mark.parametrize("where", ["mid-pass", "mid-checkpoint", "after-checkpoint", "mid-output"])
def test_a_crash_anywhere_resumes_to_the_uninterrupted_result(tmp_path, src, monkeypatch, where):
    import ue_fast.checkpoint as ckpt_mod
    from ue_fast.data.sinks import png_tree
    from ue_fast.data.sinks import write as sinks_write
    from ue_fast.generation import store as store_mod

    kw = dict(SHORT, epochs=3, store="disk", checkpoint_every=0)  # a checkpoint every round
    ue_fast.protect(src, tmp_path / "whole", **kw)
    out = tmp_path / "split"
    if where == "after-checkpoint":
        protect_killed_after_checkpoint(monkeypatch, src, out, die_at=2, **kw)
    else:
        if where == "mid-pass":  # in round 2's PGD pass (2 batches a pass), after its first batch was written
            _interrupted(monkeypatch, store_mod.PerturbationStore, "put", 4)
        elif where == "mid-checkpoint":  # torch.save of round 2's checkpoint: the rename never happens
            _interrupted(monkeypatch, ckpt_mod.torch, "save", 3)
        else:  # the outputs: some PNGs written, no manifest
            _interrupted(monkeypatch, png_tree, "write_png", 15)  # in the second chunk of PNGs
            monkeypatch.setattr(sinks_write, "chunk_rows", lambda row_bytes, target=0: 10)
        with pytest.raises(KeyboardInterrupt):
            ue_fast.protect(src, out, **kw)
        monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    ue_fast.protect(src, out, resume=True, **kw)
    _same_outputs(tmp_path / "whole", out)


def test_sigkill_mid_run_resumes_to_the_uninterrupted_result(tmp_path, src):
    """A real ``kill -9`` of the CLI at some moment of a disk run; the resumed run's outputs
    equal an uninterrupted run's whatever the moment."""
    args = [sys.executable, "-m", "ue_fast", "protect", str(src), None, "--method", "miue", "--arch", "cnn-small",
            "--epochs", "6", "--pgd-steps", "4", "--batch-size", "16", "--poison-batch-size", "32",
            "--device", "cpu", "--store", "disk", "--no-progress", "--checkpoint-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(out, *extra):
        return [str(out) if a is None else a for a in args] + list(extra)

    subprocess.run(cmd(tmp_path / "whole"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / ".ue_fast" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into a later round
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "manifest.json").exists():
        pytest.skip("the run finished before the kill (a very fast machine)")
    subprocess.run(cmd(out, "--resume"), check=True, env=env, capture_output=True)
    _same_outputs(tmp_path / "whole", out)


def test_checkpoint_every_saves_less_and_resumes_to_the_same_result(tmp_path, src, monkeypatch):
    """--checkpoint-every: a checkpoint once that many seconds have passed (a clock that moves 10 s
    per reading here), none within an hour, the same outputs either way, and a run killed after a
    checkpoint resumes from it to the uninterrupted result."""
    import ue_fast.generation.runner as runner

    kw = dict(SHORT, epochs=3)
    saves = []
    real = runner.save_checkpoint
    monkeypatch.setattr(runner, "save_checkpoint", lambda path, state: (saves.append(state.get("stage")),
                                                                        real(path, state)))
    whole = ue_fast.protect(src, tmp_path / "whole", checkpoint_every=0, **kw)
    every_step = len(saves)
    assert every_step == len(whole["history"]) >= 3
    saves.clear()
    ue_fast.protect(src, tmp_path / "hourly", checkpoint_every=3600, **kw)
    assert saves == []
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(runner, "_clock", lambda: float(next(clock)))
    ue_fast.protect(src, tmp_path / "clocked", checkpoint_every=25, **kw)
    assert 1 <= len(saves) < every_step
    monkeypatch.undo()
    for out in ("hourly", "clocked"):
        assert np.array_equal(np.load(tmp_path / out / "perturbation_int8.npy"),
                              np.load(tmp_path / "whole" / "perturbation_int8.npy"))
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(runner, "_clock", lambda: float(next(clock)))
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=1, checkpoint_every=25, **kw)
    monkeypatch.undo()
    m = ue_fast.protect(src, tmp_path / "split", resume=True, **kw)
    assert m["resumed_from_epoch"] >= 1
    assert np.array_equal(np.load(tmp_path / "split" / "perturbation_int8.npy"),
                          np.load(tmp_path / "whole" / "perturbation_int8.npy"))
    with pytest.raises(ValueError, match="checkpoint_every"):
        ue_fast.protect(src, tmp_path / "bad", checkpoint_every=-1, **kw)
