"""Compile every Triton kernel of ue_fast for sm_80 and sm_90 without a GPU; report each
cubin's registers, spills and shared memory.

    python benchmarks/triton_compile.py [--targets 80,90] [--jobs N] [--out DIR] [--only REGEX] [--list]

What is compiled is what the launchers launch. Each module of ``ue_fast.kernels`` lists input
cases (``compile_cases()``); the script runs its launchers on them with "meta" tensors
(``run_case``), nothing executes, while each ``@triton.jit`` function's ``run`` records the
call, and turns each call into a signature, constexprs and alignment attributes by the rules
of Triton's JIT (:func:`specialize`). An entry kernel (a jit function that no other one calls)
that no case launches is an error. Run it without TRITON_INTERPRET=1.

Resources, none of which needs a GPU or the CUDA toolkit: registers, stack frame, local and
static shared memory from ``cuobjdump --dump-resource-usage`` (Triton's bundled copy, else
the toolkit's), spill stores and loads from the ``ptxas -v`` log of Triton's own ptxas run, and
the dynamic shared memory the launch requests from the kernel's metadata. (A CompiledKernel's
``n_regs``/``n_spills`` exist only once a driver has loaded the cubin.)

Exit status 1 on a compile error, or on a spill or a shared-memory request over the GPU's
per-block limit in a *hot* configuration: one launched for the shapes that matter
(``SHAPES_THAT_MATTER``); the same elsewhere is marked in the table only. Status 2: an entry
kernel without cases, or Triton unusable here. Results (JSON + markdown) go to ``--out``, else
``$OUT``, else benchmarks/results/.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import contextlib
import datetime
import importlib
import inspect
import io
import json
import math
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
# Per target: the GPU whose SM count the launchers see (pgd's L2 split) and its shared memory per block.
GPUS = {80: dict(gpu="A100", num_sms=108, max_shared=166912), 90: dict(gpu="H100", num_sms=132, max_shared=232448)}
# The shapes that matter (DESIGN.md section 6), by the keys of the modules' cases: rows B, features D,
# classes C, images N x channels x H x W. A case is hot when each of these keys it has lies in range.
SHAPES_THAT_MATTER = dict(B=(128, 1024), D=(512, 512), C=(10, 1000), N=(128, 512), H=(32, 224), W=(32, 224))
_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8",
          "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1"}


# ----------------------------------------------------------------------------- what to compile


def kernel_modules() -> list:
    import ue_fast.kernels as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def jit_functions(modules) -> dict:
    """``module:name`` -> each @triton.jit function defined in ``modules``."""
    from triton.runtime.jit import JITFunction

    return {f"{mod.__name__.rsplit('.', 1)[-1]}:{name}": obj for mod in modules for name, obj in vars(mod).items()
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__}


def entry_kernels(jit: dict) -> set[str]:
    """Keys of the jit functions that no other jit function calls."""
    from triton.runtime.jit import JITFunction

    called = set()
    for fn in jit.values():
        for node in ast.walk(ast.parse(fn.src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = fn.fn.__globals__.get(node.func.id)
                if isinstance(callee, JITFunction) and callee is not fn:
                    called.add(id(callee))
    return {key for key, fn in jit.items() if id(fn) not in called}


def is_hot(case: dict) -> bool:
    """Whether the shape keys that ``case`` has all lie within SHAPES_THAT_MATTER."""
    return all(lo <= case[k] <= hi for k, (lo, hi) in SHAPES_THAT_MATTER.items() if k in case)


def specialize(fn, args, kwargs) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs by name, options) of the launch ``fn[grid](*args, **kwargs)``,
    by the rules of Triton's JIT (3.3 and later): a tensor is a pointer to its dtype, with
    tt.divisibility 16 when 16-byte aligned (allocations are; views are at their offset); an int
    equal to 1 becomes a constexpr, other ints are i32 (i64/u64 when larger) with tt.divisibility
    16 when divisible by 16; a float is fp32; constexpr parameters take their values."""
    names = fn.arg_names
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for p in fn.params:
        v = bound.arguments[p.name]
        spec = not p.do_not_specialize
        align = spec and not p.do_not_specialize_on_alignment
        if p.is_constexpr or v is None or (spec and type(v) is int and v == 1):
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif hasattr(v, "data_ptr"):
            signature[p.name] = "*" + _TYPES[str(v.dtype).removeprefix("torch.")]
            if align and v.storage_offset() * v.element_size() % 16 == 0:
                attrs[p.name] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else ("u64" if v >= 2**63 else "i64")
            if align and v % 16 == 0:
                attrs[p.name] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name}={v!r} is of a type this script does not specialize")
    return signature, constexprs, attrs, options


def record_launches(modules, jit: dict, num_sms: int) -> list[dict]:
    """One record per kernel launch of every case of every module (launchers run on meta tensors)."""
    records = []

    def recorder(key, fn):
        def run(*args, grid, warmup, **kwargs):
            sig, const, attrs, options = specialize(fn, args, kwargs)
            records.append(dict(kernel=key, signature=sig, constexprs=const, attrs=attrs, options=options))
        return run

    with contextlib.ExitStack() as stack:
        for key, fn in jit.items():
            stack.enter_context(mock.patch.object(fn, "run", recorder(key, fn)))
        for mod in modules:
            for case in getattr(mod, "compile_cases", list)():
                start = len(records)
                mod.run_case(case, "meta", num_sms=num_sms)
                for r in records[start:]:
                    r["case"] = case
    return records


def _plain(v):
    """JSON form of a constexpr or case value (dtypes by name)."""
    import triton.language as tl

    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return f"tl.{v.name}" if isinstance(v, tl.dtype) else str(v).removeprefix("torch.")


def configurations(modules, jit: dict, archs) -> list[dict]:
    """Distinct (kernel, target, specialization, options), each with the cases that launch it."""
    configs = {}
    for arch in archs:
        for r in record_launches(modules, jit, GPUS[arch]["num_sms"]):
            const = {k: _plain(v) for k, v in r["constexprs"].items()}
            key = json.dumps([r["kernel"], arch, r["signature"], const, r["attrs"], r["options"]], sort_keys=True)
            c = configs.setdefault(key, dict(kernel=r["kernel"], arch=arch, signature=r["signature"], constexprs=const,
                                             attrs=r["attrs"], options=r["options"], hot=False, cases=0))
            hot = is_hot(r["case"])
            if c["cases"] == 0 or (hot and not c["hot"]):  # the first case that launches it, a hot one if any
                c["example"] = {k: _plain(v) for k, v in r["case"].items()}
            c["cases"] += 1
            c["hot"] |= hot
    return list(configs.values())


# ----------------------------------------------------------------------------- compiling (worker side)


def _constexpr_value(v):
    import triton.language as tl

    return tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for path in (os.environ.get("TRITON_CUOBJDUMP_PATH"), bundled, shutil.which("cuobjdump"),
                 Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"):
        if path and os.access(path, os.X_OK):
            return str(path)
    return None


def parse_ptxas_log(log: str, name: str) -> dict:
    """Registers, stack and spills of entry function ``name`` from a ``ptxas -v`` log."""
    out = {}
    block = re.search(rf"Function properties for {re.escape(name)}\s*\n(.*?)(?=Compiling entry|\Z)", log, re.S)
    text = block.group(1) if block else log
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
    m = re.search(r"Used (\d+) registers", text)
    if m:
        out["registers"] = int(m[1])
    return out


def parse_cuobjdump(text: str, name: str) -> dict:
    """REG, STACK, SHARED and LOCAL of function ``name`` from ``cuobjdump --dump-resource-usage``."""
    m = re.search(rf"Function {re.escape(name)}:\s*\n\s*(.*)", text)
    if not m:
        return {}
    fields = dict((k, int(v)) for k, v in re.findall(r"(\w+):(\d+)", m[1]))
    keys = dict(REG="registers", STACK="stack", SHARED="static_shared", LOCAL="local")
    return {keys[k]: v for k, v in fields.items() if k in keys}


def compile_config(c: dict) -> dict:
    """Compile configuration ``c`` for its target; its resources, or its error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = c["kernel"].split(":")
    fn = getattr(importlib.import_module(f"ue_fast.kernels.{module}"), name)
    src = ASTSource(fn, c["signature"], constexprs={k: _constexpr_value(v) for k, v in c["constexprs"].items()},
                    attrs={(fn.arg_names.index(k),): v for k, v in c["attrs"].items()})
    log, t0 = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # ptxas's log (and, on failure, Triton's PTX dump)
            k = triton.compile(src, target=GPUTarget("cuda", c["arch"], 32), options=c["options"])
    except Exception as e:  # noqa: BLE001 - any compiler failure is a result to report
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return dict(error="; ".join(msg[:3] + (["..."] + msg[-3:] if len(msg) > 6 else msg[3:]))[:2000],
                    compile_s=time.perf_counter() - t0)
    res = dict(compile_s=time.perf_counter() - t0, num_warps=k.metadata.num_warps,
               num_stages=k.metadata.num_stages, sources=[])
    tool = _cuobjdump()
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            dump = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        if found := parse_cuobjdump(dump, fn.__name__):
            res.update(found)
            res["sources"].append("cuobjdump")
    if found := parse_ptxas_log(log.getvalue(), fn.__name__):
        res.update({k: v for k, v in found.items() if k not in res})
        res["sources"].append("ptxas -v")
    if "registers" not in res:  # last resort: the driver's count, where a GPU of this target loads the cubin
        with contextlib.suppress(Exception):
            res.update(registers=k.n_regs, local=k.n_spills, sources=["driver"])
    res["shared"] = (getattr(k.metadata, "shared", 0) or 0) + res.pop("static_shared", 0)
    return res


def _worker_init() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")  # a notice of triton 3.9, per process


# ----------------------------------------------------------------------------- report


def flags(c: dict) -> list[str]:
    """ERROR; UNREAD (no source gave the registers); SPILL; SHARED>LIMIT (the GPU's per block)."""
    if c.get("error"):
        return ["ERROR"]
    out = [] if c.get("registers") else ["UNREAD"]
    if c.get("spill_stores") or c.get("spill_loads") or ("spill_stores" not in c and c.get("local")):
        out.append("SPILL")
    if c.get("shared", 0) > GPUS[c["arch"]]["max_shared"]:
        out.append("SHARED>LIMIT")
    return out


def describe(c: dict, varying: set | None = None) -> str:
    """Compact label: pointer types, the constexprs in ``varying`` (default all), unaligned ints."""
    ptrs = dict.fromkeys(t[1:] for t in c["signature"].values() if t.startswith("*"))
    shown = c["constexprs"] if varying is None else varying
    parts = [",".join(ptrs)] + [f"{k}={v}" for k, v in c["constexprs"].items() if k in shown]
    unaligned = [k for k, t in c["signature"].items() if t in ("i32", "i64", "u64") and k not in c["attrs"]]
    return " ".join(parts + ([f"unaligned:{','.join(unaligned)}"] if unaligned else []))


def _markdown(head: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: "-" if v is None else str(v)  # noqa: E731
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(map(cell, r)) + " |" for r in rows]


def table(configs: list[dict]) -> list[str]:
    values = {}  # kernel -> constexpr -> the values it takes: label only those that vary
    for c in configs:
        for k, v in c["constexprs"].items():
            values.setdefault(c["kernel"], {}).setdefault(k, set()).add(json.dumps(v))
    rows = [[c["kernel"].split(":")[1], c["arch"],
             describe(c, {k for k, vs in values[c["kernel"]].items() if len(vs) > 1}),
             c.get("num_warps"), c.get("num_stages"), c.get("registers"),
             f"{c.get('spill_stores', '-')}/{c.get('spill_loads', '-')}", c.get("stack"), c.get("shared"),
             "yes" if c["hot"] else "", c["cases"], " ".join(flags(c))] for c in configs]
    return _markdown(["kernel", "sm", "configuration", "warps", "stages", "regs", "spill st/ld", "stack",
                      "shared", "hot", "cases", "flags"], rows)


def headline(configs: list[dict]) -> list[str]:
    groups = {}
    for c in configs:
        groups.setdefault((c["kernel"].split(":")[1], c["arch"]), []).append(c)
    rows = []
    for (kern, arch), cs in groups.items():
        ok = [c for c in cs if not c.get("error")]
        spilling = [c for c in ok if "SPILL" in flags(c)]

        def span(key):
            vals = [c[key] for c in ok if c.get(key) is not None]
            return f"{min(vals)}-{max(vals)}" if vals else None
        top = lambda key: max((c.get(key) or 0 for c in ok), default=0)  # noqa: E731
        rows.append([kern, arch, f"{len(cs)} ({sum(c['hot'] for c in cs)})", span("registers"),
                     f"{len(spilling)} ({sum(c['hot'] for c in spilling)})",
                     f"{top('spill_stores')}/{top('spill_loads')}", top("stack"), span("shared"),
                     sum(bool(c.get("error")) for c in cs)])
    return _markdown(["kernel", "sm", "configs (hot)", "registers", "spilling (hot)", "max spill st/ld",
                      "max stack", "shared", "errors"], rows)


def failures(configs: list[dict]) -> list[str]:
    """A line for each compile error or unread cubin, and each spill or shared-memory excess in a hot one."""
    out = []
    for c in configs:
        if bad := [f for f in flags(c) if f in ("ERROR", "UNREAD") or c["hot"]]:
            out.append(f"{c['kernel']} sm_{c['arch']} {' '.join(bad)}: {describe(c)}"
                       + (f" -- {c['error']}" if c.get("error") else "") + f" (e.g. {c['example']})")
    return out


def _commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_results(configs, archs, out_dir: Path, elapsed: float) -> Path:
    import torch
    import triton

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"triton-compile-{datetime.date.today().isoformat()}-triton{triton.__version__}"
    meta = dict(triton=triton.__version__, torch=torch.__version__, commit=_commit(),
                targets=[f"sm_{a} ({GPUS[a]['gpu']}, {GPUS[a]['num_sms']} SMs)" for a in archs],
                shapes_that_matter=SHAPES_THAT_MATTER, elapsed_s=round(elapsed, 1), cuobjdump=None)
    if tool := _cuobjdump():  # which one, not where (no machine paths in committed results)
        meta["cuobjdump"] = "triton's" if Path(tool).is_relative_to(Path(triton.__file__).parent) else "the toolkit's"
    doc = dict(meta, failures=failures(configs))
    records = [json.dumps(dict({k: v for k, v in c.items() if k not in ("signature", "attrs", "compile_s")},
                               signature={k: t for k, t in c["signature"].items() if t != "constexpr"},
                               aligned=sorted(c["attrs"]), compile_s=round(c.get("compile_s", 0), 2), flags=flags(c)))
               for c in configs]  # one configuration a line
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1)[:-2] + ',\n "configs": [\n  '
                                    + ",\n  ".join(records) + "\n ]\n}\n")
    md = [f"# Triton kernels compiled for {', '.join(meta['targets'])}", "",
          f"triton {meta['triton']}, torch {meta['torch']}, commit {meta['commit']}; "
          f"`python benchmarks/triton_compile.py` ({meta['elapsed_s']} s). Registers, stack, local and static shared "
          "memory from cuobjdump, spills from ptxas -v, dynamic shared memory (bytes) from the kernel's metadata. "
          "Hot: launched for the shapes that matter " + json.dumps(SHAPES_THAT_MATTER) + ".", "",
          "## Per kernel", "", *headline(configs), "", "## Failures", "",
          *([f"- {f}" for f in doc["failures"]] or ["none"]), "", "## Every configuration", "", *table(configs), ""]
    Path(f"{stem}.md").write_text("\n".join(md))
    return stem


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes (default: one per core; "
                    "1: compile in this process)")
    ap.add_argument("--out", type=Path, help="results folder (default: $OUT, else benchmarks/results)")
    ap.add_argument("--only", help="compile only kernels whose name matches this regular expression")
    ap.add_argument("--limit", type=int, help="compile at most this many configurations (a smoke test)")
    ap.add_argument("--list", action="store_true", help="print the configurations as JSON and compile nothing")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.targets.split(",")]
    if unknown := [a for a in archs if a not in GPUS]:
        ap.error(f"--targets: no GPU entry for {unknown} (known: {sorted(GPUS)})")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it", file=sys.stderr)
        return 2
    try:
        import triton
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"triton is not importable: {e}", file=sys.stderr)
        return 2
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:  # <= 3.2: constants=, AttrsDescriptor
        print(f"triton {triton.__version__}: the script needs ASTSource(constexprs=...), triton >= 3.3", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    modules = kernel_modules()
    jit = jit_functions(modules)
    entries = entry_kernels(jit)
    configs = configurations(modules, jit, archs)
    if missing := sorted(entries - {c["kernel"] for c in configs}):
        print(f"entry kernels that no compile_cases() case launches: {missing}", file=sys.stderr)
        return 2
    if args.only:
        configs = [c for c in configs if re.search(args.only, c["kernel"])]
    configs = configs[:args.limit] if args.limit else configs
    if args.list:
        json.dump(dict(entry_kernels=sorted(entries), configs=configs), sys.stdout, indent=1)
        print()
        return 0

    def tile(c):  # compile the largest tiles first: they take longest
        return -math.prod(v for k, v in c["constexprs"].items() if k.startswith("BLOCK") and isinstance(v, int))
    todo = sorted(configs, key=tile)
    print(f"compiling {len(todo)} configurations of {len(entries)} kernels for sm_{', sm_'.join(map(str, archs))} "
          f"with triton {triton.__version__}, {args.jobs} processes", flush=True)
    # A fresh cache, and ptxas run every time: its log is where the spills are read.
    knobs = dict(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, TRITON_CACHE_DIR=cache, **knobs):
        if args.jobs > 1:
            ctx = multiprocessing.get_context("spawn")  # fresh processes: no state inherited from the recording
            pool = cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init)
        else:  # in this process
            _worker_init()
            pool = cf.ThreadPoolExecutor(1)
        with pool:
            futures = {pool.submit(compile_config, c): c for c in todo}
            for i, fut in enumerate(cf.as_completed(futures), 1):
                c = futures[fut]
                c.update(fut.result())
                status = c.get("error") or " ".join([f"{c.get('registers')} regs", *flags(c)])
                print(f"[{i}/{len(todo)}] sm_{c['arch']} {c['kernel']} {describe(c)}: {status} "
                      f"({c['compile_s']:.1f} s)", flush=True)
    configs.sort(key=lambda c: (c["kernel"], c["arch"], not c["hot"], describe(c)))
    print("\n".join(["", *table(configs), "", *headline(configs)]))
    out_dir = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    stem = write_results(configs, archs, out_dir, time.perf_counter() - t0)
    print(f"\nwrote {stem}.json and .md")
    if fails := failures(configs):
        print("\nFAILED:\n" + "\n".join(fails), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
