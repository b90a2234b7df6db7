"""The product's edges, through the command line as a user meets them: nothing of the user's
lost, refusals that leave nothing behind, one run per output folder, errors a person can act
on, a newcomer's path. Fast: tiny image folders and the training-free ``lsp`` (or MI-UE's
cpu-small schedule cut to a round or two).

The data layer's cases (formats, what is left out, transparency, names) are in
test_edges_data.py; evaluate's and report's pairs, divergence and references in
test_evaluate_edges.py.
"""
import errno
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import ue_fast
from ue_fast.cli import _percent, main
from ue_fast.outputs import HOLDER_FILE, LOCK_FILE, hold


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Two classes of four 16 x 16 RGB images, one RGBA image (alpha 128), a file lying in the
    root and a hidden file."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    rgba = np.concatenate([rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), np.full((16, 16, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(root / "a" / "rgba.png")
    (root / "notes.txt").write_text("not an image")
    (root / "b" / ".hidden.png").write_bytes(b"")
    return root


def run(*args) -> int:
    return main([str(a) for a in args])


def protect_lsp(src, out, *extra) -> int:
    return run("protect", src, out, "--method", "lsp", "--device", "cpu", "--no-progress", *extra)


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- nothing of the user's lost


def test_overwrite_refuses_a_folder_with_the_users_files_and_removes_nothing(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert protect_lsp(src, out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "mystuff").mkdir()
    (out / "mystuff" / "x.py").write_text("mine")
    before = tree(out)
    capsys.readouterr()
    assert protect_lsp(src, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "mystuff/" in err and "mystuff/x.py" not in err
    assert tree(out) == before
    # without them, the earlier output is replaced, and an interrupted write's temporary file goes too
    (out / "notes.txt").unlink()
    (out / "mystuff" / "x.py").unlink()
    (out / "mystuff").rmdir()
    (out / "a" / ".0.png.0123abcd.tmp").write_bytes(b"half a png")
    assert protect_lsp(src, out, "--overwrite") == 0
    assert not (out / "a" / ".0.png.0123abcd.tmp").exists()
    assert not (out / LOCK_FILE).exists() and not (out / HOLDER_FILE).exists()


def test_a_work_folder_beside_the_users_files_is_not_a_licence_to_remove_them(src, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".ue_fast").mkdir(parents=True)
    (out / "src").mkdir()
    (out / "src" / "a.py").write_text("print('mine')")
    assert protect_lsp(src, out, "--overwrite") == 2
    assert "src/" in capsys.readouterr().err
    assert (out / "src" / "a.py").read_text() == "print('mine')"


def test_demo_output_dir_keeps_the_users_files(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    assert run("demo", "--output-dir", out, "--device", "cpu", "--no-progress", "--no-eval") == 2
    assert "thesis.tex" in capsys.readouterr().err
    assert tree(out) == ["thesis.tex"]


def test_output_inside_the_input_or_holding_it_is_refused(src, tmp_path, capsys):
    assert protect_lsp(src, src / "a" / "out") == 2
    assert "inside" in capsys.readouterr().err
    assert not (src / "a" / "out").exists()


def test_a_symlinked_output_folder_is_replaced_through_the_link(src, tmp_path):
    real = tmp_path / "real"
    assert protect_lsp(src, real) == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert protect_lsp(src, link, "--overwrite") == 0
    assert link.is_symlink() and (real / "manifest.json").is_file()


# ----------------------------------------------------------------------------- refusals leave nothing behind


@pytest.mark.parametrize("flags, says", [
    (["--method", "miue", "--resize", "1"], "16 to 1024 pixels"),
    (["--set", f"seed={2**70}"], "seed must be in"),
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N"),
    (["--eps", "0.3"], "below one grey level"),
    (["--method", "miue", "--set", "alpha=1/0"], "divides by zero"),
    (["--method", "bayes", "--store", "disk"], "needs its images and perturbations in memory"),
])
def test_refusals_come_before_anything_is_read_or_written(src, tmp_path, capsys, flags, says):
    out = tmp_path / "out"
    assert run("protect", src, out, "--no-progress", "--method", "lsp", *flags) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_torchrun_with_a_method_that_refuses_it_is_refused_before_joining(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # no rendezvous address: joining the group would fail otherwise
    assert run("protect", src, tmp_path / "out", "--method", "cuda", "--no-progress", "--device", "cpu") == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_refusal_that_needs_the_data_removes_what_the_run_created(tmp_path, capsys):
    small = tmp_path / "small"  # 8 x 8 images: the surrogate's refusal comes only once they are read
    for c in ("a", "b"):
        (small / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 10, 200)).save(small / c / f"{i}.png")
    out = tmp_path / "out"
    assert run("protect", small, out, "--preset", "cpu-small", "--device", "cpu", "--no-progress") == 2
    assert "16" in capsys.readouterr().err
    assert not out.exists()
    (out / "keep").mkdir(parents=True)  # a folder that existed before the run stays, as it was
    assert run("protect", small, out / "keep", "--preset", "cpu-small", "--device", "cpu", "--no-progress") == 2
    assert tree(out) == ["keep"]


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(min_value=1e-30, max_value=0.999, allow_nan=False))
def test_any_budget_below_one_grey_level_is_refused_at_once(eps):
    with pytest.raises(ValueError, match="below one grey level"):
        ue_fast.protect((np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1])), "never-written",
                        method="lsp", eps=eps, progress=False)
    assert not Path("never-written").exists()


@settings(max_examples=25, deadline=None)
@given(seed=st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63)))
def test_any_seed_outside_what_the_generators_take_is_refused(seed):
    with pytest.raises(ValueError, match="seed must be in"):
        ue_fast.protect((np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1])), "never-written",
                        method="lsp", seed=seed, progress=False)


# ----------------------------------------------------------------------------- one run per output folder


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with hold(out, "ue-fast protect (the first run)"):
        assert protect_lsp(src, out, "--overwrite") == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "the first run" in err and "in use" in err
        assert tree(out) == [LOCK_FILE, HOLDER_FILE] or set(tree(out)) == {LOCK_FILE, HOLDER_FILE}
    assert tree(out) == []


def test_a_lock_left_by_a_dead_process_does_not_block(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # what a killed run leaves: the lock file (no process holds its OS lock) and its holder's note
    (out / LOCK_FILE).write_text("")
    (out / HOLDER_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "command": "x", "started": "then"}))
    assert protect_lsp(src, out) == 0
    assert (out / "manifest.json").is_file() and not (out / LOCK_FILE).exists()


def test_resume_removes_an_interrupted_writes_debris(src, tmp_path, monkeypatch):
    from _helpers import protect_killed_after_checkpoint

    out = tmp_path / "out"
    protect_killed_after_checkpoint(monkeypatch, src, out, die_at=1, preset="cpu-small", epochs=2, device="cpu",
                                    progress=False)
    (out / "a").mkdir()
    debris = out / "a" / ".1.png.89abcdef.tmp"  # what a kill -9 during writing leaves
    debris.write_bytes(b"half")
    m = ue_fast.protect(src, out, preset="cpu-small", epochs=2, device="cpu", progress=False, resume=True)
    assert m["resumed_from_epoch"] == 1 and not debris.exists()
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))


# ----------------------------------------------------------------------------- errors a person can act on


def test_a_full_disk_says_so_and_how_to_go_on(src, tmp_path, capsys, monkeypatch):
    png_tree = importlib.import_module("ue_fast.data.sinks.png_tree")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(png_tree, "write_png", full)
        out = tmp_path / "out"
        assert protect_lsp(src, out) == 2
    err = capsys.readouterr().err
    assert "is full" in err and "GiB free" in err and "roughly" in err and "--resume" in err
    assert "Traceback" not in err
    assert protect_lsp(src, out, "--resume") == 0  # once space is freed, the run goes on


def test_a_read_only_file_system_says_so(src, tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self.name == "out":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert protect_lsp(src, tmp_path / "out") == 1
    assert "read-only file system" in capsys.readouterr().err


def test_a_damaged_manifest_is_named(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{broken")
    assert protect_lsp(src, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "damaged" in err
    assert (out / "manifest.json").read_text() == "{broken"


@pytest.mark.parametrize("command", [["evaluate", "--train", "x", "--test", "y"], ["demo", "--no-eval"]])
def test_an_unknown_device_is_one_line(command, capsys):
    assert run(*command, "--device", "tpu") == 2
    assert "device must be cpu, cuda or cuda:N" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what is reported


def test_protect_reports_what_it_left_out_and_keeps_alpha(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert protect_lsp(src, out) == 0
    err = capsys.readouterr().err
    assert "2 files not protected" in err and "hidden" in err and "root" in err
    m = json.loads((out / "manifest.json").read_text())
    assert {d["path"] for d in m["ignored"]} == {"notes.txt", "b/.hidden.png"} and m["alpha_kept"]
    with Image.open(src / "a" / "rgba.png") as a, Image.open(out / "a" / "rgba.png") as b:
        assert b.mode == "RGBA"
        assert np.array_equal(np.asarray(a)[..., 3], np.asarray(b)[..., 3])
        d = np.asarray(a)[..., :3].astype(int) - np.asarray(b)[..., :3].astype(int)
        assert 0 < np.abs(d).max() <= 8


def test_small_fractions_keep_their_precision():
    assert [_percent(f) for f in (0, 0.001, 0.9982, 0.99996, 1)] == ["0%", "0.1%", "99.8%", "99.996%", "100%"]


def test_a_cpu_run_of_the_papers_schedule_says_so_and_every_stage_gives_its_estimate(src, tmp_path, capsys,
                                                                                     monkeypatch):
    protect_module = importlib.import_module("ue_fast.protect")

    class Stop(Exception):
        pass

    def stop(**kw):
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(protect_module, "_generate", stop)
        with pytest.raises(Stop):
            ue_fast.protect(src, tmp_path / "paper", device="cpu")
    assert "--preset cpu-small" in capsys.readouterr().err
    ue_fast.protect(src, tmp_path / "small", device="cpu", preset="cpu-small", epochs=3)
    err = capsys.readouterr().err
    assert "--preset cpu-small" not in err and "the 2 left take about" in err


# ----------------------------------------------------------------------------- no output over an input


@pytest.fixture(scope="module")
def protected(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prot") / "out"
    assert protect_lsp(src, out) == 0
    return out


def test_evaluate_never_gives_two_outputs_one_name_nor_writes_over_its_input(src, protected, tmp_path, capsys):
    res = tmp_path / "res.png"
    assert run("evaluate", "--train", protected, "--test", src, "--device", "cpu", "--out", res) == 2
    assert "expected a .json" in capsys.readouterr().err and not res.exists()
    inp = protected / "manifest.json"
    before = inp.read_bytes()
    assert run("evaluate", "--train", protected, "--test", src, "--device", "cpu", "--out", inp) == 2
    assert inp.read_bytes() == before
    png = tmp_path / "r.png"
    png.write_text("my notes")  # the curves' name, but not a PNG
    assert run("evaluate", "--train", protected, "--test", src, "--device", "cpu", "--out", tmp_path / "r.json") == 2
    assert "not a PNG" in capsys.readouterr().err and png.read_text() == "my notes"


def test_plot_never_writes_over_the_results_it_reads(src, protected, tmp_path, capsys):
    r = tmp_path / "r.json"
    assert run("evaluate", "--train", protected, "--test", src, "--device", "cpu", "--arch", "cnn-small",
               "--epochs", "1", "--no-progress", "--out", r) == 0
    before = r.read_bytes()
    assert run("plot", r, "--out", r) == 2
    assert r.read_bytes() == before
    assert run("plot", r, "--out", tmp_path / "curves.png") == 0
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_report_out_is_never_inside_an_input_nor_a_folder_of_the_users(src, protected, tmp_path, capsys):
    common = ["--test", src, "--archs", "cnn-small", "--defenses", "none", "--epochs", "1", "--device", "cpu",
              "--no-progress"]
    assert run("report", protected, "--clean", src, "--out", src / "report", *common) == 2
    assert "inside" in capsys.readouterr().err and not (src / "report").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    assert run("report", protected, "--clean", src, "--out", mine, *common) == 2
    assert "holds no earlier report" in capsys.readouterr().err
    assert (mine / "report.md").read_text() == "my own report" and tree(mine) == ["report.md"]


def test_export_apbench_replaces_only_its_own_files_and_never_writes_into_the_protected_folder(src, protected,
                                                                                              tmp_path, capsys):
    exp = ["export-apbench", protected]
    flags = ["--type", "ops", "--allow-folder-order"]
    assert run(*exp, protected, *flags) == 2
    assert "inside" in capsys.readouterr().err and not (protected / "ops_poisons").exists()
    root = tmp_path / "apb"
    assert run(*exp, root, *flags) == 0
    data = root / "ops_poisons" / "c10" / "data"
    (data / "99.png").write_bytes(b"not ours")  # a numbered PNG the export did not write
    assert run(*exp, root, *flags, "--overwrite") == 2
    assert "99.png" in capsys.readouterr().err and (data / "99.png").read_bytes() == b"not ours"
    (data / "99.png").unlink()
    assert run(*exp, root, *flags, "--overwrite") == 0
    assert sorted(p.name for p in data.iterdir()) == sorted(f"{i}.png" for i in range(9))


def test_reading_a_folder_that_holds_a_ue_fast_output_warns(src, protected, tmp_path, capsys):
    import shutil

    folder = tmp_path / "folder"
    shutil.copytree(src, folder)
    shutil.copytree(protected, folder / "old_run")  # a protect output dropped into the data set
    assert protect_lsp(folder, tmp_path / "out") == 0
    assert "old_run/ (a protect output)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "export-apbench"])
def test_a_damaged_manifest_is_named_by_every_reader(src, protected, tmp_path, capsys, command):
    import shutil

    broken = tmp_path / "prot"
    shutil.copytree(protected, broken)
    (broken / "manifest.json").write_text("{broken")
    args = (["evaluate", "--train", broken, "--test", src, "--clean", src, "--device", "cpu"] if command == "evaluate"
            else ["export-apbench", broken, tmp_path / "apb", "--allow-folder-order"])
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert "manifest.json is not a readable JSON file" in err and "Traceback" not in err
