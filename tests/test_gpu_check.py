"""benchmarks/gpu_check.sh: the dry run goes through every step and reports each, so the
script that a GPU machine runs cannot rot unseen; its time budget fits its deadline; a step
that overruns is stopped with its children."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _helpers import SHARED_TARBALL

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # for the imports below only
try:
    import gpu_check
    import gpu_check_steps
    import gpu_generation
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

STEPS = ["build", "gpu_tests", "ops", "generation", "generation_compiled"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_step_timeouts_fit_the_deadline(dry_run):
    """Even if every step runs into its timeout, the report is written before the deadline and
    every required step still gets its reserve."""
    steps = gpu_check.plan(dry_run)
    assert [s.name for s in steps] == STEPS
    deadline = 600.0 if dry_run else 460.0
    left = deadline
    for i, step in enumerate(steps):
        t = gpu_check.step_timeout(steps, i, left)
        if step.optional and t < step.reserve_s:
            continue
        assert t >= step.reserve_s, f"{step.name} would get {t} s, less than its reserve {step.reserve_s} s"
        left -= t
    assert left >= gpu_check.REPORT_RESERVE_S


def test_a_step_that_overruns_is_stopped_with_its_children(tmp_path):
    runner = gpu_check.Runner(tmp_path / "log")
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    rc, timed_out, _ = runner.run(["bash", "-c", f"sleep 120 & echo $! > {pid_file}; wait"], timeout_s=2)
    assert timed_out and rc is None
    assert time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is delivered at once; reaping the orphan may take a moment
        try:
            os.kill(child, 0)
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {child} still runs")
    assert "timeout after 2 s" in (tmp_path / "log").read_text()


def test_scrub_replaces_whole_path_components():
    from gpu_check_report import make_scrub

    scrub = make_scrub([("/srv/repo", "."), ("/srv/repo/data", "<data>")])
    tmp = tempfile.gettempdir()
    assert scrub(f"/srv/repo/ue_fast/a.py /srv/repo/data/c.tar.gz /srv/repository {tmp}/x/y.o") == \
        "./ue_fast/a.py <data>/c.tar.gz /srv/repository <tmp>/x/y.o"


def test_load_images_from_the_demo_subset():
    images, labels, classes, source = gpu_generation.load_images(None, 3)
    assert images.shape == (30, 3, 32, 32) and labels.tolist() == sorted(labels.tolist())
    assert labels.bincount().tolist() == [3] * 10 and len(classes) == 10 and "demo" in source


@pytest.mark.skipif(not SHARED_TARBALL.exists(), reason=f"CIFAR-10 tarball not found at {SHARED_TARBALL}")
def test_load_images_from_the_tarball():
    images, labels, classes, source = gpu_generation.load_images(str(SHARED_TARBALL), 2)
    assert images.shape == (20, 3, 32, 32) and labels.bincount().tolist() == [2] * 10
    assert SHARED_TARBALL.name in source


@pytest.mark.slow
def test_dry_run_reports_every_step(tmp_path):
    """bash benchmarks/gpu_check.sh --dry-run [TARBALL]: the CIFAR-10 tarball when it is there,
    else the demo subset; every step passes or is skipped by design on a CPU."""
    # not the test run's settings: the script's benchmarks must not think they run under xdist
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UE_FAST_NAN_OUTPUTS")
           and not k.startswith("PYTEST_XDIST")}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    tarball = [str(SHARED_TARBALL)] if SHARED_TARBALL.exists() else []
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--name", "dry", *tarball],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dry-ops.json", "dry.json", "dry.log", "dry.md"]
    doc = json.loads((tmp_path / "dry.json").read_text())
    assert doc["dry_run"] and doc["ok"]
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert set(status.values()) <= set(gpu_check.STATUSES)
    assert status == dict(build="passed", gpu_tests="skipped", ops="passed", generation="passed",
                          generation_compiled="skipped"), status
    for s in doc["steps"]:
        assert s["seconds"] <= s["timeout_s"] + 30, s

    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["gpu_tests"]["result"]["skipped"] == steps["gpu_tests"]["result"]["tests"] > 0
    ops = json.loads((tmp_path / "dry-ops.json").read_text())
    suites = {Path(b["fullname"].split("::")[0]).name for b in ops["benchmarks"]}
    assert suites == set(gpu_check_steps.BENCH_SUITES)
    assert all(b["extra_info"]["floor_s"] > 0 for b in ops["benchmarks"])
    gen = steps["generation"]["result"]
    assert (SHARED_TARBALL.name if tarball else "demo") in gen["data"]["source"]
    assert [e["epoch"] for e in gen["ue_fast"]["epochs"]] == [1, 2] and len(gen["plain"]["epochs"]) == 1
    c = gen["comparison"]
    assert c["plain_over_ue_fast_last"] == pytest.approx(c["plain_ms_per_image"] / c["ue_fast_ms_per_image_last"])
    assert c["full_schedule_hours"]["ue_fast"] == pytest.approx(c["ue_fast_ms_per_image_last"] * 5e6 / 3.6e6)
    assert set(gen["profile"]["stage_shares"]) >= {"forward", "backward", "loss", "step"}
    assert gen["profile"]["trace"]["top"]

    md = (tmp_path / "dry.md").read_text()
    assert "DRY RUN" in md and all(f"## {name}" in md for name in STEPS[:4])
    for f in ("dry.json", "dry.md", "dry.log", "dry-ops.json"):
        text = (tmp_path / f).read_text()
        assert str(ROOT) not in text and tempfile.gettempdir() + "/" not in text, f"{f} names a machine path"


def test_report_of_a_check_that_went_wrong(tmp_path):
    """Failures, timeouts and partial results are all reported, with the failing output's tail."""
    from gpu_check_report import write_report

    epoch = dict(epoch=1, train_s=1.0, poison_s=2.0, s=3.0, ms_per_image=0.3, images_per_s=3333.0)
    partial = dict(arch="resnet18", device="cuda", data=dict(source="x.tar.gz", images=10000, image_size=[32, 32]),
                   ue_fast=dict(epochs=[epoch], settings=dict(arch="resnet18"), linf_max_255=8, images_changed=10))
    doc = dict(name="bad", dry_run=False, started_utc="2026-01-01T00:00:00", deadline_s=460, total_s=470, ok=False,
               env=dict(device="NVIDIA H200", python="3.12"), steps=[
                   dict(name="build", title="build", optional=False, timeout_s=225, seconds=12, status="failed",
                        note="pip failed", tail="error: command 'nvcc' failed\nlast line of the build"),
                   dict(name="gpu_tests", title="pytest -m gpu", optional=False, timeout_s=150, seconds=150,
                        status="timeout", note="timed out", result={}),
                   dict(name="ops", title="ops", optional=False, timeout_s=0, seconds=0, status="not_run", note="-"),
                   dict(name="generation", title="MI-UE", optional=False, timeout_s=100, seconds=100,
                        status="timeout", result=partial),
                   dict(name="generation_compiled", title="compiled", optional=True, timeout_s=90, seconds=3,
                        status="failed", result=dict(unexpected="shape"), tail="Traceback\nRuntimeError: boom")])
    write_report(doc, tmp_path)
    md = (tmp_path / "bad.md").read_text()
    assert "**FAILED**" in md and "last line of the build" in md and "RuntimeError: boom" in md
    assert "| ue_fast | 1 | 1.00 | 2.00 | 3.00 | 0.3 | 3333 |" in md
    assert json.loads((tmp_path / "bad.json").read_text())["steps"][3]["result"]["ue_fast"]["linf_max_255"] == 8
