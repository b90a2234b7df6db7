"""Results of gpu_check.py: reading what the steps wrote, writing the report (JSON and markdown).

NAME.json holds every step with its status, seconds, timeout, note and result; NAME.md
is the same for a reader; both are rewritten after every step, so a check cut off
from outside still leaves what it had.
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from summarize import markdown as benchmarks_markdown

SETTINGS_SHOWN = ("arch", "epochs", "pgd_steps", "batch_size", "poison_batch_size", "post_aug", "loss",
                  "delta_dtype", "compact_delta", "compile")


def cubin_archs(so_path: str | None) -> list[str] | None:
    """The sm_XX of the machine code embedded in the extension (cuobjdump), or None if it cannot tell."""
    if not so_path:
        return None
    try:
        r = subprocess.run(["cuobjdump", "--list-elf", so_path], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sorted(set(re.findall(r"sm_\d+a?", r.stdout))) if r.returncode == 0 else None


def junit_counts(path: Path) -> dict:
    """Counts and failing tests from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    get = lambda k: int(suite.get(k, 0))  # noqa: E731
    failed = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").strip().splitlines()
            failed.append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:200] if msg else ''}")
    res = dict(tests=get("tests"), failures=get("failures"), errors=get("errors"), skipped=get("skipped"),
               seconds=float(suite.get("time", 0)), failed=failed)
    res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
    return res


def compact(bench: dict) -> dict:
    """A pytest-benchmark entry reduced to what the report shows."""
    ex = bench.get("extra_info", {})
    med = bench["stats"]["median"]
    dob = ex.get("do_bench_median_ms")
    t = dob * 1e-3 if dob is not None else med
    return dict(group=bench.get("group"), variant=ex.get("variant", bench["name"]), median_s=med,
                do_bench_s=dob * 1e-3 if dob is not None else None, peak_mem_bytes=ex.get("peak_mem_bytes"),
                floor_s=ex.get("floor_s"), floor_bound=ex.get("floor_bound"),
                over_floor=t / ex["floor_s"] if ex.get("floor_s") else None)


def merge_benchmarks(parts: dict[str, dict]) -> dict | None:
    """One pytest-benchmark document of the suites' runs (summarize.py reads it). Each suite's
    process measured the ceilings its floors use: machine_info keeps them per suite."""
    if not parts:
        return None
    first = next(iter(parts.values()))
    merged = dict(first)
    merged["machine_info"] = dict(first.get("machine_info", {}),
                                  ceilings_by_suite={k: p.get("machine_info", {}).get("ceilings")
                                                     for k, p in parts.items()})
    merged["benchmarks"] = [b for p in parts.values() for b in p.get("benchmarks", [])]
    return merged


# -------------------------------------------------------------------------------------- report
def make_scrub(pairs: list[tuple[str, str]]):
    """A function replacing each path prefix (longest first) by its placeholder, and what is
    left under the temporary folder by <tmp>: results get committed, machine paths must not be."""
    pairs = pairs + [(tempfile.gettempdir(), "<tmp>")]
    end = r"(?=[/\s'\",:;)\]]|$)"  # a whole path component: /srv/repo, not /srv/repository
    pairs = [(re.compile(re.escape(a.rstrip("/")) + end), b)
             for a, b in sorted(pairs, key=lambda p: -len(p[0])) if len(a.rstrip("/")) > 1]

    def scrub(text: str) -> str:
        for a, b in pairs:
            text = a.sub(b, text)
        return text

    return scrub


def write_report(doc: dict, out_dir: Path, scrub=lambda text: text) -> None:
    name = doc["name"]
    _write(out_dir / f"{name}.json", scrub(json.dumps(doc, indent=1, default=str)))
    _write(out_dir / f"{name}.md", scrub(render(doc, out_dir)))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 \
        else f"{seconds * 1e6:.3g} us"


def _gib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def render(doc: dict, out_dir: Path) -> str:
    env = doc["env"]
    device = env.get("device") or f"CPU ({env.get('cpus')} cores)"
    lines = [f"# ue_fast GPU check: {device}, {doc['started_utc'][:10]}", ""]
    if doc["dry_run"]:
        lines += ["**DRY RUN** on the CPU at toy sizes: it checks that the script runs through; "
                  "its numbers mean nothing.", ""]
    state = "OK" if doc.get("ok") else "FAILED"
    lines += [f"Verdict: **{state}** after {doc.get('total_s', 0):.0f} s (deadline {doc['deadline_s']:.0f} s). "
              f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
              f"triton {env.get('triton')}, nvcc: {env.get('nvcc') or 'not found'}, commit {env.get('commit')}, "
              f"{env.get('cpus')} CPUs" + (f", {env['gpu_memory_gib']} GiB GPU memory, compute capability "
                                           f"{env.get('capability')}" if env.get("gpu_memory_gib") else "") + ".",
              "", "| step | status | seconds | timeout | note |", "|---|---|---|---|---|"]
    for r in doc["steps"]:
        opt = " (optional)" if r["optional"] else ""
        lines.append(f"| {r['name']}{opt} | {r['status']} | {r.get('seconds', '-')} | {r['timeout_s']} | "
                     f"{str(r.get('note', '')).replace('|', '/')} |")
    lines.append("")
    for r in doc["steps"]:
        try:
            body = SECTIONS.get(r["name"], lambda r, d: [])(r, out_dir)
        except Exception as e:  # a result of an unexpected shape must not cost the rest of the report
            body = [f"(this section could not be shown: {type(e).__name__}: {e}; the JSON has the result)", ""]
        if body or r.get("tail"):
            lines += [f"## {r['name']}: {r['title']}", ""] + body
        if r.get("tail") and r["status"] != "passed":
            lines += ["Last lines of its output:", "", "```text", *r["tail"].splitlines()[-25:], "```", ""]
    return "\n".join(lines)


def _build(r: dict, out_dir: Path) -> list[str]:
    f = r.get("result")
    if not f:
        return []
    out = [f"- ue_fast: `{f['ue_fast']}`; extension: `{f.get('ext') or f.get('ext_error')}`",
           f"- backends on cpu: {f.get('backends_cpu')}"]
    if f.get("backends_cuda"):
        out.append(f"- backends on cuda: {f['backends_cuda']}")
    if "cubin_archs" in f:
        out.append(f"- machine code in the extension (cuobjdump): {f['cubin_archs'] or 'unknown'}; "
                   f"torch's arch list: {f.get('torch_arch_list')}")
    return out + [""]


def _tests(r: dict, out_dir: Path) -> list[str]:
    f = r.get("result")
    if not f:
        return []
    out = [f"{f['tests']} gpu tests: {f['passed']} passed, {f['failures']} failed, {f['errors']} errors, "
           f"{f['skipped']} skipped, {f['seconds']:.0f} s (the log lists each test and the 10 slowest).", ""]
    return out + [f"- FAILED {name}" for name in f["failed"]] + ([""] if f["failed"] else [])


def _ops(r: dict, out_dir: Path) -> list[str]:
    f = r.get("result")
    if not f or not (out_dir / f["file"]).exists():
        return []
    doc = json.loads((out_dir / f["file"]).read_text())
    out = ["Floors: max(bytes moved / copy bandwidth, matrix FLOPs / bf16 matmul rate), both measured at "
           "the start of each suite (benchmarks/floors.py); 'over floor' uses the do_bench median where "
           f"there is one. Raw results: `{f['file']}`.", ""]
    for suite, c in (f.get("ceilings") or {}).items():
        for dev, v in (c or {}).items():
            out.append(f"- {suite} on {dev}: copy {v['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
                       f"{v['bf16_flops_per_s'] / 1e12:.3g} TFLOP/s")
    doc["machine_info"].pop("ceilings", None)  # listed per suite above
    return out + ["", benchmarks_markdown(doc), ""]


def _epoch_rows(label: str, run: dict) -> list[str]:
    part = lambda e, k: f"{e[k]:.2f}" if k in e else "-"  # noqa: E731  (the plain run is timed as a whole)
    return [f"| {label} | {e['epoch']} | {part(e, 'train_s')} | {part(e, 'poison_s')} | {e['s']:.2f} | "
            f"{e['ms_per_image']:.3g} | {e['images_per_s']:.0f} |" for e in run["epochs"]]


def _generation(r: dict, out_dir: Path) -> list[str]:
    g = r.get("result") or {}
    if "data" not in g:
        return []
    d = g["data"]
    out = [f"{g.get('arch')} on {d['images']} images of {d['source']}, {d['image_size'][0]}x{d['image_size'][1]}"
           + (f" (read in {d['read_s']:.1f} s)" if "read_s" in d else "") + f", {g.get('device')}.", ""]
    runs = [(k, g[k]) for k in ("ue_fast", "plain", "eager", "compiled") if k in g]
    if runs:
        out += ["| run | outer epoch | train s | poison s | total s | ms / image | images / s |",
                "|---|---|---|---|---|---|---|"]
        for k, run in runs:
            out += _epoch_rows(k if k != "compiled" else f"compiled ({g.get('compile_mode')})", run)
        out.append("")
        for k, run in runs:
            if run.get("settings"):
                shown = {s: run["settings"][s] for s in SETTINGS_SHOWN if s in run["settings"]}
                out.append(f"- {k}: settings {shown}; output L-inf {run['linf_max_255']}/255, "
                           f"{run.get('images_changed')} of {d['images']} images changed; "
                           f"peak GPU memory {_gib(run.get('peak_gpu_bytes'))}")
            elif "linf_max_255" in run:
                out.append(f"- {k}: perturbation L-inf {run['linf_max_255']:.3g}/255; peak GPU memory "
                           f"{_gib(run.get('peak_gpu_bytes'))}")
        out.append("")
    c = g.get("comparison")
    if c:
        h = c["full_schedule_hours"]
        out += [f"Plain / ue_fast per image: **{c['plain_over_ue_fast_last']:.2f}x** against ue_fast's last outer "
                f"epoch ({c['ue_fast_ms_per_image_last']:.3g} ms against {c['plain_ms_per_image']:.3g} ms), "
                f"{c['plain_over_ue_fast_first']:.2f}x against its first (which includes the warm-up). "
                f"Projected for the authors' full schedule (100 outer epochs x 50,000 images): ue_fast "
                f"**{h['ue_fast']:.2f} h**, plain {h['plain']:.2f} h.", ""]
    if "speedup_last_epoch" in g:
        out += [f"compile={g.get('compile_mode')!r} against eager, last outer epoch: "
                f"**{g['speedup_last_epoch']:.2f}x** (the first compiled epoch pays the compilation).", ""]
    p = g.get("profile")
    if p:
        out += [f"Where the time goes: `protect(profile=True)`, 2 outer epochs on {p['images']} of the images "
                f"(synchronised at every stage, so slower than the timed run; the first epoch also traced). "
                f"Seconds per stage over both epochs:", "", "| stage | seconds | share |", "|---|---|---|"]
        out += [f"| {k} | {p['timings_s'][k]:.2f} | {v:.0%} |" for k, v in p.get("stage_shares", {}).items()]
        t = p.get("trace") or {}
        if t.get("top"):
            busy = f"; GPU busy {t['gpu_busy_fraction']:.0%} of the traced span" if "gpu_busy_fraction" in t else ""
            out += ["", f"Top {t['kind']} in the trace of the first epoch ({t['total_ms']:.0f} ms in all{busy}):", "",
                    "| name | ms | share | calls |", "|---|---|---|---|"]
            out += [f"| `{k['name']}` | {k['ms']:.1f} | {k['share']:.0%} | {k['calls']} |" for k in t["top"]]
        out.append("")
    return out


SECTIONS = {"build": _build, "gpu_tests": _tests, "ops": _ops, "generation": _generation,
            "generation_compiled": _generation}
