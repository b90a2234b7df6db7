"""`protect` end to end on real images (a subset of the shipped CIFAR-10 demo), on the CPU."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ue_fast
from _helpers import demo_subset as _subset
from _helpers import protect_killed_after_checkpoint
from ue_fast.cli import main as cli_main
from ue_fast.data import read_image_folder
from ue_fast.data.exports import load_delta_npy, load_poison_pt
from ue_fast.protect import UnchangedImagesWarning, quantize

FAST = dict(arch="cnn-small", epochs=2, pgd_steps=2, batch_size=16, poison_batch_size=32, progress=False,
            device="cpu")


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    src = _subset(tmp_path_factory.mktemp("in"))
    before = _tree_hash(src)
    out = tmp_path_factory.mktemp("out") / "protected"
    manifest = ue_fast.protect(src, out, eps=8, **FAST)
    return src, out, manifest, before


def test_every_pixel_within_budget_and_tree_mirrored(small_run):
    src, out, manifest, _ = small_run
    clean = read_image_folder(src, progress=False)
    prot = read_image_folder(out, progress=False)
    assert prot.classes == clean.classes
    assert [p.rsplit(".", 1)[0] for p in prot.paths] == [p.rsplit(".", 1)[0] for p in clean.paths]
    assert all(p.endswith(".png") for p in prot.paths)
    diff = prot.images.to(torch.int16) - clean.images.to(torch.int16)
    assert int(diff.abs().max()) <= 8
    assert int(diff.abs().max()) > 0, "nothing was perturbed"
    # the exports carry exactly the perturbation the PNGs carry
    poison = load_poison_pt(out / "poison.pt")
    assert poison.dtype == torch.float32 and poison.shape == clean.images.shape
    torch.testing.assert_close(poison, diff.float() / 255, rtol=0, atol=1e-7)
    assert torch.equal(load_delta_npy(out / "perturbation_int8.npy").to(torch.int16), diff)


def test_input_untouched_and_no_checkpoint_left(small_run):
    src, out, _, before = small_run
    assert _tree_hash(src) == before
    assert not (out / ".ue_fast").exists()


def test_manifest_is_consistent(small_run):
    src, out, manifest, _ = small_run
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["num_images"] == manifest["num_images"] == 36
    assert on_disk["method"] == "miue" and on_disk["settings"]["eps_255"] == 8
    assert on_disk["settings"]["epochs"] == 2 and on_disk["settings"]["arch"] == "cnn-small"
    assert on_disk["counts"] == [12, 12, 12] and on_disk["classes"] == ["airplane", "cat", "ship"]
    assert len(on_disk["files"]) == 36 and len(on_disk["history"]) == 2
    assert max(f["linf_255"] for f in on_disk["files"]) == on_disk["linf_max_255"] <= 8
    for f in on_disk["files"]:
        assert (out / f["output"]).is_file() and (src / f["source"]).is_file()
    for key in ("torch", "ue_fast", "numpy", "pillow"):
        assert key in on_disk["versions"]
    for stage in ("read images", "surrogate training", "forward", "backward", "step", "writing"):
        assert stage in on_disk["timings_s"]
    assert on_disk["images_per_s"] > 0


def test_same_seed_same_result(small_run, tmp_path):
    src, out, _, _ = small_run
    ue_fast.protect(src, tmp_path / "again", eps=8, **FAST)
    assert (tmp_path / "again" / "perturbation_int8.npy").read_bytes() == (out / "perturbation_int8.npy").read_bytes()


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    src = _subset(tmp_path / "in", per_class=8)
    settings = dict(FAST, epochs=3)
    ue_fast.protect(src, tmp_path / "whole", **settings)

    # killed right after the second outer epoch's checkpoint
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=2, **settings)
    assert (tmp_path / "split" / ".ue_fast" / "checkpoint.pt").is_file()
    assert not (tmp_path / "split" / "manifest.json").exists()
    with pytest.raises(ValueError, match="not empty"):
        ue_fast.protect(src, tmp_path / "split", **settings)
    m = ue_fast.protect(src, tmp_path / "split", resume=True, **settings)
    assert m["resumed_from_epoch"] == 2
    a = (tmp_path / "whole" / "perturbation_int8.npy").read_bytes()
    b = (tmp_path / "split" / "perturbation_int8.npy").read_bytes()
    assert a == b, "resumed run differs from the uninterrupted one"


def test_resume_refuses_other_settings(tmp_path, monkeypatch):
    src = _subset(tmp_path / "in", per_class=4)
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "o", **FAST)
    with pytest.raises(ValueError, match="settings differ"):
        ue_fast.protect(src, tmp_path / "o", resume=True, **dict(FAST, pgd_steps=3))


# -- bad input ---------------------------------------------------------------------------

def test_corrupt_image_named_or_skipped(tmp_path):
    src = _subset(tmp_path / "in", per_class=4)
    (src / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        ue_fast.protect(src, tmp_path / "o1", **FAST)
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").iterdir())
    m = ue_fast.protect(src, tmp_path / "o2", skip_bad=True, **FAST)
    assert [s["path"] for s in m["skipped"]] == ["cat/broken.jpg"]
    assert m["num_images"] == 12


def test_mixed_sizes_need_resize(tmp_path):
    src = _subset(tmp_path / "in", per_class=4)
    Image.new("RGB", (40, 40), (10, 20, 30)).save(src / "cat" / "big.png")
    with pytest.raises(ValueError, match="resize"):
        ue_fast.protect(src, tmp_path / "o", **FAST)
    m = ue_fast.protect(src, tmp_path / "o2", resize=32, **FAST)
    assert m["image_size"] == [32, 32]


def test_single_class_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="2 classes"):
        ue_fast.protect(_subset(tmp_path / "one", classes=("cat",), per_class=4), tmp_path / "o", **FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty|no image|no class"):
        ue_fast.protect(tmp_path / "empty", tmp_path / "o2", **FAST)


@pytest.mark.parametrize("eps", [0, -1, 256, 1000.5])
def test_eps_out_of_range(tmp_path, eps):
    with pytest.raises(ValueError, match="eps"):
        ue_fast.protect(tmp_path, tmp_path / "o", eps=eps, **FAST)


def test_output_inside_input_and_nonempty_output(tmp_path):
    src = _subset(tmp_path / "in", per_class=2)
    with pytest.raises(ValueError, match="inside the input"):
        ue_fast.protect(src, src / "out", **FAST)
    with pytest.raises(ValueError, match="inside the output"):
        ue_fast.protect(src, tmp_path, **FAST)
    (tmp_path / "busy" / "sub").mkdir(parents=True)
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        ue_fast.protect(src, tmp_path / "busy", **FAST)
    # --overwrite and --resume replace or continue only an earlier ue_fast output
    for flag in ("overwrite", "resume"):
        with pytest.raises(ValueError, match=r"not a ue_fast output.*keep.txt, sub/"):
            ue_fast.protect(src, tmp_path / "busy", **{flag: True}, **FAST)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and (tmp_path / "busy" / "sub").is_dir()
    (tmp_path / "busy" / "manifest.json").write_text('{"method": "someone else\'s"}')
    with pytest.raises(ValueError, match="not a ue_fast output"):
        ue_fast.protect(src, tmp_path / "busy", overwrite=True, **FAST)
    # an earlier output is replaced of what it wrote, and only if it holds nothing else
    ue_fast.protect(src, tmp_path / "ours", **FAST)
    (tmp_path / "ours" / "stale.txt").write_text("yours, not ue_fast's")
    with pytest.raises(ValueError, match="stale.txt, which ue_fast did not write"):
        ue_fast.protect(src, tmp_path / "ours", overwrite=True, **FAST)
    assert (tmp_path / "ours" / "stale.txt").read_text() == "yours, not ue_fast's"
    (tmp_path / "ours" / "stale.txt").unlink()
    ue_fast.protect(src, tmp_path / "ours", overwrite=True, **FAST)
    assert (tmp_path / "ours" / "manifest.json").is_file()


def test_demo_refuses_a_folder_that_is_not_its_output(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert cli_main(["demo", "--output-dir", str(tmp_path), "--no-eval", "--no-progress"]) == 2
    assert "not a ue_fast output" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_manifest_records_the_absolute_input_for_evaluate(tmp_path, monkeypatch):
    from ue_fast.evaluate.run import _clean_counterpart

    _subset(tmp_path / "work" / "in", per_class=2)
    monkeypatch.chdir(tmp_path / "work")
    m = ue_fast.protect(Path("in"), Path("out"), **FAST)
    assert m["input"] == "in" and m["input_abs"] == str((tmp_path / "work" / "in").resolve())
    monkeypatch.chdir(tmp_path)  # `evaluate --mi` run from elsewhere still finds the clean images
    prot = read_image_folder(tmp_path / "work" / "out", progress=False)
    clean = _clean_counterpart(tmp_path / "work" / "out", prot, None, None)
    assert clean.images.shape == prot.images.shape


def test_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    """Not a terminal (pytest captures stderr): one plain line per stage, no carriage returns."""
    src = _subset(tmp_path / "in", per_class=2)
    ue_fast.protect(src, tmp_path / "o", **dict(FAST, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    for stage in ("reading images: 6/6 img", "epoch 1: surrogate: 6/6 img", "epoch 2: PGD x2: 6/6 img",
                  "miue outer epochs: 2/2 epoch", "writing images: 6/6 img"):
        assert any(line.startswith(stage) for line in lines), f"no line for {stage!r} in:\n{err}"
    assert len(lines) < 20


def test_arrays_api(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (20, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()
    labels = np.arange(20) % 2
    m = ue_fast.protect((imgs, labels), tmp_path / "o", eps=4, **FAST)
    assert m["num_images"] == 20 and m["linf_max_255"] <= 4


def test_cli_protect_and_errors(tmp_path, capsys):
    src = _subset(tmp_path / "in", per_class=4)
    args = ["protect", str(src), str(tmp_path / "o"), "--arch", "cnn-small", "--epochs", "1", "--pgd-steps", "1",
            "--batch-size", "16", "--poison-batch-size", "16", "--device", "cpu", "--eps", "4", "--no-progress",
            "--profile"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "protected 12 images of 3 classes" in out and "time per stage" in out
    trace = json.loads((tmp_path / "o" / "profile_trace.json").read_text())
    assert trace["traceEvents"], "the profiler trace is empty"
    assert cli_main(args) == 2  # output not empty
    assert "not empty" in capsys.readouterr().err
    assert cli_main(args[:-1] + ["--eps", "0"]) == 2
    assert "eps" in capsys.readouterr().err


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    """A real kill (SIGKILL of the CLI mid-run), then --resume: the same bytes as a run never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = _subset(tmp_path / "in", per_class=4)
    flags = ["--arch", "cnn-small", "--epochs", "300", "--pgd-steps", "1", "--batch-size", "4",
             "--poison-batch-size", "12", "--device", "cpu", "--no-progress", "--checkpoint-every", "0"]
    out = tmp_path / "killed"
    # Same thread count as this process: CPU reductions are bit-reproducible only at equal thread counts.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "ue_fast", "protect", str(src), str(out), *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / ".ue_fast" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few more epochs, so the kill lands mid-run
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    epoch_at_kill = sum("epoch" in h for h in torch.load(ckpt, weights_only=True)["history"])
    assert 0 < epoch_at_kill < 300
    assert cli_main(["protect", str(src), str(out), *flags, "--resume"]) == 0
    assert cli_main(["protect", str(src), str(tmp_path / "whole"), *flags]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["resumed_from_epoch"] == epoch_at_kill
    assert (out / "perturbation_int8.npy").read_bytes() == (tmp_path / "whole" / "perturbation_int8.npy").read_bytes()


def test_compile_option_runs_the_same_algorithm(tmp_path):
    """compile=True (torch.compile of the surrogate) gives a valid protection close to the eager run:
    compiled kernels round differently, and sign steps amplify a few of those differences."""
    src = _subset(tmp_path / "in", per_class=8)
    eager = ue_fast.protect(src, tmp_path / "eager", **FAST)
    compiled = ue_fast.protect(src, tmp_path / "compiled", compile=True, **FAST)
    assert compiled["settings"]["compile"] is True and compiled["linf_max_255"] <= 8
    a = load_delta_npy(tmp_path / "eager" / "perturbation_int8.npy")
    b = load_delta_npy(tmp_path / "compiled" / "perturbation_int8.npy")
    assert a.abs().max() > 0 and b.abs().max() > 0
    assert (a != b).float().mean() < 0.1, "the compiled run drifted far from the eager one"
    assert eager["files"] == compiled["files"]
    with pytest.raises(ValueError, match="compile"):
        ue_fast.protect(src, tmp_path / "bad", compile="fastest", **FAST)
    assert not (tmp_path / "bad").exists(), "a bad setting must be refused before anything is written"


# -- the 8-bit output rounding (quantize) ------------------------------------------------------

SHORT = dict(arch="cnn-small", epochs=1, pgd_steps=2, batch_size=16, poison_batch_size=64)  # 2 steps of 0.2/255

def test_quantize_stochastic_is_unbiased_and_bounded(gen):
    clean = torch.randint(0, 256, (64, 3, 16, 16), generator=gen, dtype=torch.uint8)
    frac = torch.rand(clean.shape, generator=gen) * 2 - 1  # within one grey level
    delta = frac / 255
    out = quantize(clean, delta, 8, "stochastic", seed=1).to(torch.int16) - clean.to(torch.int16)
    inside = (clean > 0) & (clean < 255)  # away from the pixel-range clip
    assert (out[inside] - frac[inside]).abs().max() < 1  # floor or ceil of the value
    err = (out[inside].float() - frac[inside]).mean()  # unbiased: mean error ~ 0 (sd ~ 0.5/sqrt(n))
    assert abs(float(err)) < 0.01
    nearest = quantize(clean, delta, 8, "nearest").to(torch.int16) - clean.to(torch.int16)
    assert torch.equal(nearest[inside], frac[inside].round().to(torch.int16))
    # same seed, same output; another seed, another draw
    assert torch.equal(quantize(clean, delta, 8, seed=1), quantize(clean, delta, 8, seed=1))
    assert not torch.equal(quantize(clean, delta, 8, seed=1), quantize(clean, delta, 8, seed=2))


def test_quantize_keeps_whole_levels_and_the_budget():
    clean = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    # whole grey levels carried with float noise (as float16 stores them) stay exact
    delta = torch.tensor([8.0, -8.0, 3.0, 0.0]).repeat_interleave(12).view(1, 3, 4, 4) / 255
    noisy = (delta.half().float() + 1e-4 / 255)
    for _ in range(3):
        out = quantize(clean, noisy, 8, "stochastic", seed=_).to(torch.int16) - 100
        assert torch.equal(out, (delta * 255).round().to(torch.int16))
    # a budget that is not a whole number of grey levels: never exceeded
    out = quantize(clean, torch.full_like(delta, 8.5 / 255), 8.5, "nearest").to(torch.int16) - 100
    assert int(out.max()) == 8
    # the pixel range
    edge = torch.tensor([0, 255], dtype=torch.uint8).repeat(24).view(1, 3, 4, 4)
    out = quantize(edge, torch.full_like(delta, 0.9 / 255) * torch.where(edge == 0, -1, 1), 8, seed=0)
    assert torch.equal(out, edge)
    with pytest.raises(ValueError, match="rounding"):
        quantize(clean, delta, 8, "floor")


def test_quantize_shares_the_rounding_of_a_class(gen):
    """A class-wise perturbation stays one perturbation per class after rounding."""
    labels = torch.arange(12) % 3
    delta = (torch.rand(3, 3, 8, 8, generator=gen) * 6 - 3)[labels] / 255  # fractional, shared per class
    clean = torch.full((12, 3, 8, 8), 128, dtype=torch.uint8)
    d = quantize(clean, delta, 8, seed=0, shared=labels).to(torch.int16) - 128
    for c in range(3):
        assert all(torch.equal(d[i], d[c]) for i in range(c, 12, 3))
    assert not torch.equal(d, delta.mul(255).round().to(torch.int16))  # it did round stochastically
    per_image = quantize(clean, delta, 8, seed=0).to(torch.int16) - 128
    assert not all(torch.equal(per_image[i], per_image[0]) for i in range(0, 12, 3))


def test_short_run_changes_pixels_and_nearest_rounding_is_flagged(tmp_path):
    """The issue's case: one outer epoch of two 0.2/255 steps on real images."""
    src = _subset(tmp_path / "in", per_class=8)
    m = ue_fast.protect(src, tmp_path / "sto", progress=False, device="cpu", **SHORT)
    assert m["unchanged_images"] == 0 and m["linf_max_255"] == 1
    assert 0.1 < m["changed_pixels_fraction"] < 0.45  # ~ mean |delta| in grey levels (<= 0.4)
    assert m["changed_pixels_fraction"] == pytest.approx(m["mean_abs_delta_255"], abs=0.03)
    with pytest.warns(UnchangedImagesWarning, match=r"all 24 protected images .* at most 0.4/255"):
        m = ue_fast.protect(src, tmp_path / "near", progress=False, device="cpu", rounding="nearest", **SHORT)
    assert m["unchanged_images"] == 24 and m["linf_max_255"] == 0


def test_cli_exits_non_zero_when_no_image_changed(tmp_path, capsys):
    from ue_fast.cli import main

    src = _subset(tmp_path / "in", per_class=4)
    args = ["protect", str(src), str(tmp_path / "o"), "--arch", "cnn-small", "--epochs", "1", "--pgd-steps", "2",
            "--device", "cpu", "--no-progress", "--rounding", "nearest"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "warning: all 12 protected images are identical" in err and "error: no image changed" in err
    assert (tmp_path / "o" / "manifest.json").is_file()  # the outputs are still written
    assert main(args[:-2] + ["--overwrite"]) == 0  # stochastic rounding: pixels change
