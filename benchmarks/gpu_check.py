"""One call on a GPU machine gives the whole verdict: build, GPU tests, op benchmarks, MI-UE generation.

Driven by gpu_check.sh (usage there). Each step runs in its own process group with
its own timeout, inside one deadline for the whole check (``--deadline``, 460 s on a
GPU: the script must end within 8 minutes), and is recorded whatever happens to
the others:

1. build                pip install -e . (no dependencies, no index, no build isolation) with
                        TORCH_CUDA_ARCH_LIST set to the GPU's architecture, so ue_fast._C is built
                        in place; then a fresh interpreter checks that ue_fast, ue_fast._C and
                        ue_fast.kernels import from this checkout and which backends run
2. gpu_tests            pytest -m gpu tests
3. ops                  the op benchmarks with their floors, one pytest process per suite
4. generation           gpu_generation.py: MI-UE with ResNet-18 on 10,000 CIFAR-10 images
5. generation_compiled  (optional, when enough time is left) the same with compile="reduce-overhead"

A step's timeout is its own cap, shortened so that every later required step keeps its
reserve before the deadline. Statuses: passed, failed, timeout, skipped (by design, e.g.
the GPU tests on a CPU), not_run (no time left). The exit status is 1 when a required
step did not pass (or was not run), or an optional one failed; timeouts of an optional
step are reported only.

The report, rewritten after every step: NAME.json, NAME.md, NAME.log and NAME-ops.json
(the merged pytest-benchmark results) in the output folder.

--dry-run runs the same steps on the CPU at toy sizes: the extension is not rebuilt (the
installed one is checked), GPU tests skip, torch.compile variants are off. It exists so
that CI keeps the script working; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpu_check_report import make_scrub, write_report
from gpu_check_steps import ROOT, Check, child_env

STATUSES = ("passed", "failed", "timeout", "skipped", "not_run")
REPORT_RESERVE_S = 5


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    cap_s: float  # its own timeout
    reserve_s: float  # kept for it while earlier steps run; an optional step needs this much to start
    optional: bool = False


def plan(dry_run: bool) -> list[Step]:
    if dry_run:
        return [Step("build", "import check (dry run: not rebuilt)", 60, 20),
                Step("gpu_tests", "pytest -m gpu", 150, 30),
                Step("ops", "op benchmarks (toy sizes)", 200, 60),
                Step("generation", "MI-UE generation (toy size)", 240, 60),
                Step("generation_compiled", "MI-UE generation, compile='reduce-overhead'", 30, 0, optional=True)]
    return [Step("build", "build ue_fast._C in place", 225, 0),
            Step("gpu_tests", "pytest -m gpu", 150, 60),
            Step("ops", "op benchmarks", 200, 70),
            Step("generation", "MI-UE generation", 170, 100),
            Step("generation_compiled", "MI-UE generation, compile='reduce-overhead'", 150, 100, optional=True)]


def step_timeout(steps: list[Step], i: int, left_s: float) -> float:
    """Seconds step ``i`` may take when ``left_s`` remain: its cap, less the reserves of the
    required steps after it and of the report."""
    later = sum(s.reserve_s for s in steps[i + 1:] if not s.optional) + REPORT_RESERVE_S
    return max(0.0, min(steps[i].cap_s, left_s - later))


class Runner:
    """Runs commands in their own process group with a timeout, teeing output to the console and a log."""

    def __init__(self, log_path: Path, scrub=lambda text: text):
        self.log = open(log_path, "a", buffering=1)
        self.scrub = scrub  # the log is a result: no machine paths in it
        self.proc: subprocess.Popen | None = None

    def stop_steps_with_this_process(self) -> None:
        """Steps run in their own sessions, out of reach of a signal to this process's group:
        when this process is stopped (the shell's backstop, Ctrl-C), stop the running step too."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum, frame):
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.log.write(self.scrub(msg) + "\n")

    def run(self, cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int | None, bool, str]:
        """(return code or None if killed, timed out, the last lines of output)."""
        self.say(f"+ {' '.join(cmd)}   (timeout {timeout_s:.0f} s)")
        tail = collections.deque(maxlen=60)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
        self.proc = proc

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                self.log.write(self.scrub(line))
                tail.append(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(f"!! timeout after {timeout_s:.0f} s: stopping {cmd[0]} and its children")
            _signal_group(proc.pid, signal.SIGTERM)  # lets pytest and pip end cleanly
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc.pid, signal.SIGKILL)  # whatever is left of the step, e.g. compile workers
        proc.wait()
        reader.join(timeout=5)
        sys.stdout.flush()
        return (None if timed_out else proc.returncode), timed_out, "\n".join(tail)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def probe(python: str) -> tuple[dict, dict]:
    """Versions and the device, and the interpreter's prefixes, asked of a fresh interpreter
    (this process never touches CUDA)."""
    code = (
        "import json, os, platform, sys, torch\n"
        "d = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,\n"
        "         cuda_available=torch.cuda.is_available(), cpus=os.cpu_count())\n"
        "paths = dict(prefix=sys.prefix, base_prefix=sys.base_prefix)\n"
        "try:\n    import triton; d['triton'] = triton.__version__\nexcept Exception as e:\n"
        "    d['triton'] = f'unavailable ({type(e).__name__})'\n"
        "if d['cuda_available']:\n"
        "    d['device'] = torch.cuda.get_device_name(); d['capability'] = '%d.%d' % torch.cuda.get_device_capability()\n"
        "    d['gpu_memory_gib'] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)\n"
        "print(json.dumps(d)); print(json.dumps(paths))\n")
    out = subprocess.run([python, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{python} cannot import torch:\n{out.stderr[-2000:]}")
    info, paths = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    for cmd, key in ((["nvcc", "--version"], "nvcc"), (["git", "rev-parse", "--short", "HEAD"], "commit")):
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
            info[key] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info[key] = None
    if info["commit"]:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, timeout=20)
        info["commit"] += " (modified)" if r.stdout.strip() else ""
    elif os.environ.get("UE_FAST_COMMIT"):  # a copy of the tree without git: the caller says which commit
        info["commit"] = os.environ["UE_FAST_COMMIT"] + " (given by UE_FAST_COMMIT)"
    return info, paths


def slug(info: dict, dry_run: bool) -> str:
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if dry_run or not info.get("device"):
        return f"cpu-dry-run-{day}"
    name = re.sub(r"[^a-z0-9]+", "-", info["device"].lower().replace("nvidia", "")).strip("-")
    return f"{name or 'gpu'}-{day}"


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ue_fast's GPU check (see benchmarks/gpu_check.sh)")
    ap.add_argument("tarball", nargs="?", default=None,
                    help="CIFAR-10 image-folder tarball (train/<class>/*.jpg); default: the demo subset")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    ap.add_argument("--name", default=None, help="file name stem of the report (default: <device>-<date>)")
    ap.add_argument("--steps", default=None, help="comma-separated subset of the steps to run")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole check (default 460 on a GPU, 600 for a dry run)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the steps")
    args = ap.parse_args(argv)
    if args.tarball is not None:
        if not Path(args.tarball).is_file():
            ap.error(f"tarball {args.tarball!r}: no such file")
        args.tarball = str(Path(args.tarball).resolve())
    args.out_dir = args.out_dir.resolve()
    if args.deadline is not None and args.deadline <= REPORT_RESERVE_S:
        ap.error(f"--deadline must exceed {REPORT_RESERVE_S} s, got {args.deadline}")
    return args


def main(argv=None) -> int:
    t_start = time.monotonic()
    args = parse_args(argv)
    steps = plan(args.dry_run)
    names = [s.name for s in steps]
    chosen = names if args.steps is None else [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"gpu_check: unknown step(s) {unknown}; the steps are {names}", file=sys.stderr)
        return 2
    deadline = args.deadline or (600.0 if args.dry_run else 460.0)
    try:
        info, paths = probe(args.python)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if not args.dry_run and not info.get("cuda_available"):
        print("gpu_check: torch sees no CUDA device; use --dry-run to run the steps on the CPU", file=sys.stderr)
        return 2
    args.name = args.name or slug(info, args.dry_run)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        print(f"gpu_check: --name may hold letters, digits, '.', '_' and '-' only, got {args.name!r}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = args.out_dir / f"{args.name}.log"
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix="ue_fast_gpu_check_") as tmp:
        system = {"/", "/usr", "/usr/local"}  # an interpreter installed there: leave system paths alone
        scrub = make_scrub([(str(ROOT), "."), (tmp, "<work>"), (os.path.expanduser("~"), "~")]
                           + [(paths[k], f"<{k}>") for k in ("prefix", "base_prefix") if paths[k] not in system]
                           + ([(str(Path(args.tarball).parent), "<data>")] if args.tarball else []))
        runner = Runner(log, scrub)
        runner.stop_steps_with_this_process()
        check = Check(args, info, runner, Path(tmp))
        doc = dict(what="ue_fast gpu_check", dry_run=args.dry_run, name=args.name,
                   started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   deadline_s=deadline, tarball=Path(args.tarball).name if args.tarball else None, env=info,
                   steps=[])
        runner.say(f"== ue_fast gpu_check{' (DRY RUN on the CPU, toy sizes)' if args.dry_run else ''}: "
                   f"{json.dumps(info)}")
        for i, step in enumerate(steps):
            left = deadline - (time.monotonic() - t_start)
            timeout = step_timeout(steps, i, left)
            rec = dict(name=step.name, title=step.title, optional=step.optional, timeout_s=round(timeout, 1))
            runner.say(f"\n== step {i + 1}/{len(steps)}: {step.name} ({step.title}); {left:.0f} s left")
            t0 = time.monotonic()
            if step.name not in chosen:
                rec.update(status="skipped", note="not among --steps")
            elif timeout < max(step.reserve_s if step.optional else 0, 10):
                rec.update(status="not_run", note=f"{left:.0f} s left of the {deadline:.0f} s deadline: no time")
            else:
                try:
                    rec.update(getattr(check, step.name)(timeout))
                except Exception as e:  # a bug of this script must not cost the other steps
                    rec.update(status="failed", note=f"gpu_check error: {type(e).__name__}: {e}")
            rec["seconds"] = round(time.monotonic() - t0, 1)
            runner.say(f"== {step.name}: {rec['status']} in {rec['seconds']} s: {rec.get('note', '')}")
            doc["steps"].append(rec)
            doc["total_s"] = round(time.monotonic() - t_start, 1)
            doc["ok"] = verdict(doc["steps"])
            write_report(doc, args.out_dir, scrub)
    runner.say("\n" + (args.out_dir / f"{args.name}.md").read_text())
    runner.say(f"gpu_check: {'OK' if doc['ok'] else 'FAILED'} in {doc['total_s']:.0f} s; "
               f"report in {args.out_dir}/{args.name}.{{json,md,log}}")
    return 0 if doc["ok"] else 1


def verdict(records: list[dict]) -> bool:
    """True when every required step passed or was skipped by design and no optional one failed."""
    for r in records:
        if r["optional"]:
            if r["status"] == "failed":
                return False
        elif r["status"] not in ("passed", "skipped"):
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
