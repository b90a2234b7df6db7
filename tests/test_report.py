"""`ue-fast report`: every cell, the clean references, the outputs, resuming after a kill, other tools' poisons."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import ue_fast
from _helpers import demo_subset
from ue_fast.cli import main as cli_main
from ue_fast.evaluate import report as report_mod

CLASSES = ("airplane", "cat", "ship")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    train = demo_subset(root / "train", CLASSES, 8)
    test = demo_subset(root / "test", CLASSES, 4, "test")
    prot = root / "protected"
    ue_fast.protect(train, prot, arch="cnn-small", epochs=1, pgd_steps=1, batch_size=8, poison_batch_size=24,
                    progress=False, device="cpu")
    return train, test, prot


def _args(prot, train, test, out, *extra):
    return ["report", str(prot), "--clean", str(train), "--test", str(test), "--out", str(out), "--archs", "cnn-small",
            "--epochs", "1", "--batch-size", "12", "--device", "cpu", "--no-progress", *extra]


def test_report_runs_every_cell_and_writes_table_heatmap_json(sets, tmp_path, capsys, monkeypatch):
    train, test, prot = sets
    calls = []
    real = report_mod.evaluate

    def spy(train_set, test_set, **kw):
        calls.append((kw["defense"], kw.get("poison_ratio"), "clean" not in kw))
        return real(train_set, test_set, **kw)

    monkeypatch.setattr(report_mod, "evaluate", spy)
    out = tmp_path / "rep"
    assert cli_main(_args(prot, train, test, out, "--defenses", "none,bdr", "--poison-ratios", "1,0.5")) == 0
    # per defence: the clean reference, the protected set, the half-protected mix
    assert calls == [("none", None, True), ("none", None, False), ("none", 0.5, False),
                     ("bdr", None, True), ("bdr", None, False), ("bdr", 0.5, False)]
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(
        f"{k}_cnn-small_{d}{r}.json" for d in ("none", "bdr") for k, r in (("clean", ""), ("protected", "_r1"),
                                                                            ("protected", "_r0.5")))
    doc = json.loads((out / "report.json").read_text())
    assert doc["complete"] and doc["format"] == report_mod.FORMAT and len(doc["rows"]) == 2
    row = doc["rows"][1]
    cells = doc["cells"]
    assert row["defense"] == "bdr" and row["clean"] == cells["clean_cnn-small_bdr"]["last"]
    full, half = row["ratios"]["1"], row["ratios"]["0.5"]
    assert full["gap"] == pytest.approx(row["clean"] - cells["protected_cnn-small_bdr_r1"]["last"])
    part = cells["protected_cnn-small_bdr_r0.5"]["poison_ratio"]
    assert part["protected"] == 12 and half["clean_part"] == part["clean_part"]["last"]
    assert half["gap"] == pytest.approx(half["clean_part"] - half["protected"])
    # peaks: the protected victim's best epoch, the gap at both victims' peaks
    prot_cell, clean_cell = cells["protected_cnn-small_bdr_r1"], cells["clean_cnn-small_bdr"]
    assert full["protected_peak"] == prot_cell["peak_accuracy"] == max(prot_cell["test_acc"])
    assert prot_cell["test_acc"][full["protected_peak_epoch"] - 1] == full["protected_peak"]
    assert full["peak_gap"] == pytest.approx(clean_cell["peak_accuracy"] - prot_cell["peak_accuracy"])
    assert half["peak_gap"] == pytest.approx(part["clean_part"]["best"] - half["protected_peak"])
    # robustness: the worst case over the defences, per victim and ratio
    (rob,) = doc["robustness"]["1"]
    worst = max(doc["rows"], key=lambda r: r["ratios"]["1"]["protected"])
    assert rob["arch"] == "cnn-small" and rob["defenses"] == ["none", "bdr"]
    assert rob["last"]["accuracy"] == worst["ratios"]["1"]["protected"] and rob["last"]["defense"] == worst["defense"]
    assert rob["last"]["gap"] == min(r["ratios"]["1"]["gap"] for r in doc["rows"])
    assert rob["peak"]["accuracy"] == max(r["ratios"]["1"]["protected_peak"] for r in doc["rows"])
    md = (out / "report.md").read_text()
    assert ("| victim | defence | clean | protected | gap | peak (epoch) | peak gap | mixed 0.5 | clean part 0.5 | "
            "gap 0.5 | peak 0.5 (epoch) | peak gap 0.5 |") in md
    assert "## Robustness" in md and f"- cnn-small: worst case {100 * rob['last']['accuracy']:.1f}% under" in md
    assert md.count("| cnn-small |") == 2 and "Incomplete" not in md
    assert md in capsys.readouterr().out
    with Image.open(out / "heatmap.png") as im:
        assert im.format == "PNG" and im.size[0] > 200

    # a second run reuses every cell; other settings recompute them
    calls.clear()
    assert cli_main(_args(prot, train, test, out, "--defenses", "none,bdr", "--poison-ratios", "1,0.5")) == 0
    assert calls == []
    assert cli_main(_args(prot, train, test, out, "--defenses", "none", "--poison-ratios", "1", "--seed", "1")) == 0
    assert len(calls) == 2


def test_report_resumes_after_a_kill(sets, tmp_path):
    """Killed (SIGKILL) once its first cell is on disk, then rerun: the finished cells are not trained
    again, and the report completes."""
    train, test, prot = sets
    out = tmp_path / "rep"
    args = [a for a in _args(prot, train, test, out, "--defenses", "none,grayscale,bdr", "--epochs", "3")
            if a != "--no-progress"]  # the progress lines say how many cells were reused
    cmd = [sys.executable, "-m", "ue_fast"] + args
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cells = out / "cells"
    deadline = time.time() + 300
    # the first cell on disk and the partial report written after it (report.json, then report.md)
    def started():
        return cells.is_dir() and any(cells.glob("*.json")) and (out / "report.md").exists()

    while time.time() < deadline and not started():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert 1 <= len(done) < 6, done
    assert not json.loads((out / "report.json").read_text())["complete"]
    assert "Incomplete" in (out / "report.md").read_text()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    after = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert len(after) == 6 and all(after[k] == v for k, v in done.items())
    assert f"reused={len(done)}" in rerun.stderr.replace(" ", "")
    assert json.loads((out / "report.json").read_text())["complete"]


def test_report_takes_another_tools_poisons(sets, tmp_path):
    """A class-wise poison tensor against the clean base set, as the MI-UE or EM code write it: the
    report rebuilds the protected images from it and sets them against the clean ones."""
    train, test, _ = sets
    gen = torch.Generator().manual_seed(0)
    noise = (torch.randint(-8, 9, (3, 3, 32, 32), generator=gen).float() / 255)
    torch.save(noise, tmp_path / "poison.pt")
    out = tmp_path / "rep"
    doc = report_mod.report(tmp_path / "poison.pt", train, test, out, archs=["cnn-small"], defenses=["none"],
                            epochs=1, batch_size=12, device="cpu", progress=False)
    assert doc["inputs"]["protected"]["kind"] == "tensor" and doc["complete"]
    cell = doc["cells"]["protected_cnn-small_none_r1"]
    assert cell["train_source"]["layout"].startswith("class-wise")


def test_report_ud_reuses_each_clean_victim(sets, tmp_path, monkeypatch):
    train, test, prot = sets
    trained = []
    from ue_fast.evaluate import run as run_mod

    real = run_mod.train_victim

    def spy(images, *a, **kw):
        trained.append(len(images))
        return real(images, *a, **kw)

    monkeypatch.setattr(run_mod, "train_victim", spy)
    doc = report_mod.report(prot, train, test, tmp_path / "rep", archs=["cnn-small"], defenses=["none"], epochs=2,
                            batch_size=12, device="cpu", ud=True, ud_samples=12, ud_iters=1, progress=False)
    assert trained == [24, 24]  # the clean victim once (its own UD reference), the protected one
    clean, prot_cell = doc["cells"]["clean_cnn-small_none"], doc["cells"]["protected_cnn-small_none_r1"]
    assert clean["ud"]["ud"] == 1 and prot_cell["ud"]["sal"]["clean"] == clean["ud"]["sal"]["protected"]
    assert doc["rows"][0]["ratios"]["1"]["ud"] == prot_cell["ud"]["ud"]
    assert "| UD |" in (tmp_path / "rep" / "report.md").read_text()


def test_report_refuses_bad_input(sets, tmp_path):
    train, test, prot = sets
    kw = dict(epochs=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown archs"):
        report_mod.report(prot, train, test, tmp_path / "r", archs=["resnet19"], **kw)
    with pytest.raises(ValueError, match="unknown defenses"):
        report_mod.report(prot, train, test, tmp_path / "r", defenses=["none", "blur"], **kw)
    with pytest.raises(ValueError, match=r"fractions in \(0, 1\]"):
        report_mod.report(prot, train, test, tmp_path / "r", poison_ratios=[1.5], **kw)
    with pytest.raises(ValueError, match="does not exist"):
        report_mod.report(tmp_path / "missing", train, test, tmp_path / "r", **kw)
    assert not (tmp_path / "r").exists()


def test_robustness_lines_say_when_a_row_is_a_probe():
    """A contrastive learner's row is a linear probe against the probe on the clean images: the
    robustness lines say so where it is the worst case or the smallest gap; a defence's row is named plainly."""
    from ue_fast.evaluate.report_doc import _robustness_lines

    entry = {"arch": "cnn-small", "left_out": [],
             "last": {"accuracy": 0.4, "defense": "jpeg", "gap": -0.05, "gap_defense": "simclr"},
             "peak": {"accuracy": 0.45, "defense": "moco", "epoch": 3, "gap": 0.01, "gap_defense": "grayscale"}}
    (line,) = [x for x in _robustness_lines({"1": [entry]}, 3) if x.startswith("- cnn-small")]
    assert "under jpeg (last epoch)" in line
    assert "-5.0 points under simclr (a linear probe's, against the probe on the clean images)" in line
    assert "45.0% under moco (a linear probe's" in line and "peak gap 1.0 under grayscale" in line
