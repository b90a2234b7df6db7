"""The steps of gpu_check.py, each a method of ``Check`` that takes its timeout in seconds and
returns its record: status, note, result and, when it went wrong, the tail of its output."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gpu_check_report import compact, cubin_archs, junit_counts, merge_benchmarks

ROOT = Path(__file__).resolve().parents[1]
BENCH_SUITES = ("bench_supcon.py", "bench_pgd.py", "bench_covariance.py", "bench_centroid.py")


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Overrides that would change what is measured: Triton's interpreter, a forced backend.
    for name in ("TRITON_INTERPRET", "UE_FAST_BACKEND", "UE_FAST_NAN_OUTPUTS"):
        env.pop(name, None)
    env.update(extra or {})
    return env


class Check:
    """The steps, run through ``runner`` (gpu_check.Runner) with scratch space in ``work``."""

    def __init__(self, args, info: dict, runner, work: Path):
        self.args, self.info, self.runner, self.work = args, info, runner, work
        self.py = args.python
        self.env_extra: dict = {}  # set by the build step when it falls back to a source tree

    def env(self, extra: dict | None = None) -> dict:
        return child_env({**self.env_extra, **(extra or {})})

    def build(self, timeout_s: float) -> dict:
        end = time.monotonic() + timeout_s
        pip_failed = False
        if self.args.dry_run:
            note = "dry run: not rebuilt; the installed ue_fast is checked"
        else:
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or self.info.get("capability") or "9.0"
            env = self.env({"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4)})
            rc, timed_out, tail = self.runner.run(
                [self.py, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                 "--disable-pip-version-check", "-e", "."], timeout_s, env)
            if timed_out:
                return dict(status="timeout", note=f"pip install -e . (TORCH_CUDA_ARCH_LIST={arch}) timed out")
            note = f"built in place with TORCH_CUDA_ARCH_LIST={arch}"
            if rc != 0:
                pip_failed, pip_tail = True, tail
                fallback = self._fallback_build(env, end - time.monotonic())
                if fallback is None:
                    return dict(status="failed", note=f"pip install -e . failed (exit {rc}), and so did "
                                "setup.py build_ext --inplace; see the log", tail=tail[-3000:])
                note = f"pip install -e . failed (exit {rc}); {fallback}"
        rc, _, tail = self.runner.run([self.py, "-c", IMPORT_CHECK], max(end - time.monotonic(), 30), self.env())
        try:
            found = json.loads(tail.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return dict(status="failed", note=f"{note}; the import check failed (exit {rc})", tail=tail[-3000:])
        problems = []
        if not Path(found["ue_fast"]).resolve().is_relative_to(ROOT):
            problems.append(f"ue_fast imports from {found['ue_fast']}, not from this checkout")
        if not found.get("ext"):
            problems.append("ue_fast._C does not import: " + found.get("ext_error", "?"))
        if not self.args.dry_run:
            cuda = found.get("backends_cuda") or {}
            problems += [f"backend {b} on cuda: {cuda.get(b)}" for b in ("triton", "cuda") if cuda.get(b) != "ok"]
            found["cubin_archs"] = cubin_archs(found.get("ext"))
        out = dict(status="failed" if problems or pip_failed else "passed", note="; ".join([note] + problems),
                   result=found)
        if pip_failed:
            out["tail"] = pip_tail[-3000:]
        return out

    def _fallback_build(self, env: dict, timeout_s: float) -> str | None:
        """After pip failed: build in place with setup.py, and let the later steps import ue_fast
        from a tree of links (ue_fast/* plus kernels/ as ue_fast/kernels) on PYTHONPATH.
        Returns what was done, or None if that failed too."""
        if timeout_s < 20:
            return None
        rc, _, _ = self.runner.run([self.py, "setup.py", "build_ext", "--inplace"], timeout_s, env)
        if rc != 0:
            return None
        tree = self.work / "src" / "ue_fast"
        tree.mkdir(parents=True)
        for p in (ROOT / "ue_fast").iterdir():
            (tree / p.name).symlink_to(p)
        (tree / "kernels").symlink_to(ROOT / "kernels")
        self.env_extra["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree.parent), os.environ.get("PYTHONPATH")]))
        return "built with setup.py build_ext --inplace instead; the later steps import ue_fast from a tree of links"

    def gpu_tests(self, timeout_s: float) -> dict:
        xml = self.work / "gpu-tests.xml"
        rc, timed_out, tail = self.runner.run(
            [self.py, "-m", "pytest", "-m", "gpu", "tests", "-v", "-p", "no:cacheprovider", "-o", "addopts=-ra",
             f"--junitxml={xml}", "--durations=10"], timeout_s, self.env())
        res = junit_counts(xml) if xml.exists() else {}
        if timed_out:
            return dict(status="timeout", note="pytest -m gpu timed out (the log lists the tests that ran)", result=res)
        ran = res.get("tests", 0) - res.get("skipped", 0)
        if rc == 0 and ran == 0 and not self.info.get("cuda_available"):
            return dict(status="skipped", note=f"no CUDA device: all {res.get('skipped', 0)} gpu tests skipped",
                        result=res)
        if rc == 0 and ran > 0:
            return dict(status="passed", note=f"{res['passed']} passed, {res['skipped']} skipped", result=res)
        why = "every gpu test skipped although torch sees a GPU" if rc == 0 else f"pytest exit {rc}"
        return dict(status="failed", note=f"{why}: {res.get('failures', 0) + res.get('errors', 0)} failed",
                    result=res, tail=tail[-3000:])

    def ops(self, timeout_s: float) -> dict:
        extra = {"UE_FAST_BENCH_SIZE": "toy", "UE_FAST_BENCH_COMPILE": "0"} if self.args.dry_run else {}
        end = time.monotonic() + timeout_s
        parts, notes, status = {}, [], "passed"
        for k, suite in enumerate(BENCH_SUITES):
            left = end - time.monotonic() - 15 * (len(BENCH_SUITES) - k - 1)  # keep a little for the rest
            if left < 10:
                notes.append(f"{suite}: not run (no time left)")
                status = "timeout"
                continue
            out = self.work / f"ops-{suite[:-3]}.json"
            rc, timed_out, _ = self.runner.run(
                [self.py, "-m", "pytest", f"benchmarks/{suite}", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                 f"--benchmark-json={out}"], left, self.env(extra))
            if timed_out:
                notes.append(f"{suite}: timeout")
                status = "timeout" if status == "passed" else status
            elif rc != 0:
                notes.append(f"{suite}: exit {rc}")
                status = "failed"
            if out.exists():
                parts[suite] = json.loads(out.read_text())
        merged = merge_benchmarks(parts)
        if not merged:
            return dict(status="failed" if status == "passed" else status, note="; ".join(["no results"] + notes))
        name = f"{self.args.name}-ops.json"
        (self.args.out_dir / name).write_text(self.runner.scrub(json.dumps(merged, indent=1)))
        rows = [compact(b) for b in merged["benchmarks"]]
        return dict(status=status, note="; ".join([f"{len(rows)} benchmarks"] + notes),
                    result=dict(file=name, ceilings=merged["machine_info"]["ceilings_by_suite"], benchmarks=rows))

    def _generation(self, timeout_s: float, phase: str) -> dict:
        out = self.work / f"generation-{phase}.json"
        a = self.args
        cmd = [self.py, "benchmarks/gpu_generation.py", "--phase", phase, "--out", str(out),
               "--work", str(self.work / f"gen-{phase}")]
        cmd += ["--tarball", a.tarball] if a.tarball else []
        if a.dry_run:
            cmd += ["--per-class", "4", "--arch", "cnn-small", "--profile-images", "40", "--device", "cpu"]
        else:
            cmd += ["--per-class", "1000" if a.tarball else "100", "--device", "cuda"]
        rc, timed_out, tail = self.runner.run(cmd, timeout_s, self.env())
        res = json.loads(out.read_text()) if out.exists() else {}
        if timed_out:
            return dict(status="timeout", note="timed out; the parts done are reported", result=res)
        if rc != 0:
            return dict(status="failed", note=f"exit {rc}; see the log", result=res, tail=tail[-3000:])
        source = res.get("data", {}).get("source", "?")
        return dict(status="passed", note=f"{res.get('arch')} on {source}", result=res)

    def generation(self, timeout_s: float) -> dict:
        return self._generation(timeout_s, "main")

    def generation_compiled(self, timeout_s: float) -> dict:
        if self.args.dry_run:
            return dict(status="skipped", note="dry run: CUDA graphs need a GPU (the gpu tests cover the path)")
        return self._generation(timeout_s, "compiled")


IMPORT_CHECK = r"""
import json, torch, ue_fast, ue_fast.kernels
d = dict(ue_fast=ue_fast.__file__, kernels=ue_fast.kernels.__file__, ext=None,
         backends_cpu=ue_fast.available_backends("cpu"))
try:
    import ue_fast._C as ext
    d["ext"] = ext.__file__
except Exception as e:
    d["ext_error"] = f"{type(e).__name__}: {e}"
if torch.cuda.is_available():
    d["backends_cuda"] = ue_fast.available_backends("cuda")
    d["torch_arch_list"] = torch.cuda.get_arch_list()
print(json.dumps(d))
"""
