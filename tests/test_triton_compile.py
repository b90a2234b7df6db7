"""benchmarks/triton_compile.py: the enumeration reaches every Triton kernel and the configurations
the launchers pick, its specialization agrees with Triton's JIT, one kernel compiles for sm_90
without a GPU, and the verdict fails on what it should.

The script runs in subprocesses: this session sets TRITON_INTERPRET=1, under which the kernels
are interpreted and cannot be compiled."""
import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "triton_compile.py"
_spec = importlib.util.spec_from_file_location("triton_compile", SCRIPT)
tc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tc)  # its top level imports neither triton's kernels nor torch


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent), env.get("PYTHONPATH", "")])
    return env


def _python(code: str, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _ast_entry_kernels() -> set[str]:
    """``module:name`` of the @triton.jit functions in kernels/*.py that no other jit function calls,
    found from the source text alone (independently of the script)."""
    jit, calls = {}, set()
    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                jit[node.name] = f"{path.stem}:{node.name}"
                calls |= {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call)
                          and isinstance(c.func, ast.Name) and c.func.id != node.name}
    return {key for name, key in jit.items() if name not in calls}


_ENUMERATE = r"""
import contextlib, json
from unittest import mock
import triton_compile as tc

out = {}
mods = tc.kernel_modules()
jit = tc.jit_functions(mods)
out["entries"] = sorted(tc.entry_kernels(jit))
out["configs"] = [{k: c[k] for k in ("kernel", "arch", "hot", "signature", "constexprs", "options")}
                  for c in tc.configurations(mods, jit, [80, 90])]

# What the launchers' configuration helpers can return, over D = 1..2048.
import torch
import ue_fast.kernels.centroid as centroid
import ue_fast.kernels.pgd as pgd
import ue_fast.kernels.supcon as supcon
Ds = range(1, 2049)
out["pickable"] = dict(
    # per feature dtype, D aligned to 16 elements or not (the backward's tile depends on both)
    supcon=[sorted({json.dumps(dict(supcon._blocks(128, D, getattr(torch, dt), aligned)[i], dtype=tag), sort_keys=True)
                    for D in Ds for dt, tag in (("float32", "*fp32"), ("bfloat16", "*bf16"), ("float16", "*fp16"),
                                                ("float64", "*fp64"))
                    for aligned in {D % 16 == 0, False}}) for i in (0, 1)],
    centroid_rows=sorted({(dt, *centroid._row_blocks(D, getattr(torch, dt)))
                          for D in Ds for dt in ("float32", "float64")}),
    centroid_class=sorted({(dt, *centroid._class_blocks(D, getattr(torch, dt)))
                           for D in Ds for dt in ("float32", "float64")}),
    pgd={norm: pgd._config(norm) for norm in ("linf", "l2")}, pgd_mask_dims=pgd._MAX_MASK_DIMS)

# The script's specialization against Triton's own (a private API: checked where it exists).
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
except ImportError:
    out["fidelity"] = None
else:
    backend, calls, diff = make_backend(GPUTarget("cuda", 90, 32)), [], []
    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            calls.append((fn, args, kwargs))
        return run
    with contextlib.ExitStack() as stack:
        for fn in jit.values():
            stack.enter_context(mock.patch.object(fn, "run", recorder(fn)))
        for m in mods:
            for case in getattr(m, "compile_cases", list)():
                m.run_case(case, "meta", num_sms=132)
    for fn, args, kwargs in calls:
        sig, const, attrs, _ = tc.specialize(fn, args, kwargs)
        bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
        _, tsig, tconst, tattrs = fn._pack_args(backend, kwargs, bound, spec, options)
        theirs = (tsig, {fn.arg_names[k[0]]: v for k, v in tconst.items()},
                  {fn.arg_names[k[0]]: v for k, v in tattrs.items() if v})
        if (sig, const, attrs) != theirs:
            diff.append(f"{fn.__name__}: {(sig, const, attrs)} != {theirs}")
    out["fidelity"] = dict(calls=len(calls), diff=diff[:5])

# An entry kernel that no case launches makes the script exit with status 2.
import ue_fast.kernels.pgd as pgd
real = pgd.compile_cases
with mock.patch.object(pgd, "compile_cases", lambda: [c for c in real() if c["norm"] != "l2"]):
    out["status_missing"] = tc.main(["--list", "--targets", "90"])
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def enumeration():
    proc = _python(_ENUMERATE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_every_entry_kernel_has_configurations_on_both_targets(enumeration):
    expected = _ast_entry_kernels()
    assert len(expected) >= 8  # supcon fwd/bwd, centroid norm/fwd/bwd, pgd linf/l2 reduce/l2 update
    assert set(enumeration["entries"]) == expected
    for arch in (80, 90):
        hot = {c["kernel"] for c in enumeration["configs"] if c["arch"] == arch and c["hot"]}
        assert hot == expected, f"sm_{arch}: kernels without a configuration for the shapes that matter"


def test_enumeration_reaches_every_choice_of_the_launchers(enumeration):
    by_kernel, pick = {}, enumeration["pickable"]
    for c in enumeration["configs"]:
        by_kernel.setdefault(c["kernel"].split(":")[1], []).append(c)

    def chosen(name, keys):  # with the features' dtype (the launchers pick tiles per dtype)
        return {json.dumps(dict({k: c["constexprs"][k] for k in keys}, **c["options"], dtype=c["signature"]["F_ptr"]),
                           sort_keys=True) for c in by_kernel[name]}
    assert set(pick["supcon"][0]) <= chosen("_supcon_fwd_kernel", ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    assert set(pick["supcon"][1]) <= chosen("_supcon_bwd_kernel", ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D"))
    for name in ("_centroid_norm_kernel", "_centroid_bwd_kernel"):  # every tile; each accumulation dtype's largest
        blocks = {(("float64" if c["signature"]["N_ptr"] == "*fp64" else "float32"), c["constexprs"]["BLOCK_B"],
                   c["constexprs"]["BLOCK_D"]) for c in by_kernel[name]}
        assert {tuple(p[1:]) for p in pick["centroid_rows"]} <= {b[1:] for b in blocks}, name
        for acc in ("float32", "float64"):
            assert max(tuple(p) for p in pick["centroid_rows"] if p[0] == acc) in blocks, (name, acc)
    assert {tuple(p) for p in pick["centroid_class"]} <= {
        ("float64" if c["signature"]["S_ptr"] == "*fp64" else "float32", c["constexprs"]["BLOCK_B"],
         c["constexprs"]["BLOCK_D"], c["options"].get("num_warps", 4)) for c in by_kernel["_centroid_fwd_kernel"]}
    for name in ("_supcon_fwd_kernel", "_supcon_bwd_kernel", "_centroid_norm_kernel", "_centroid_bwd_kernel"):
        inputs = {next(t for t in c["signature"].values() if t.startswith("*")) for c in by_kernel[name]}
        assert inputs == {"*fp32", "*bf16", "*fp16", "*fp64"}, name
    for name, norm in (("_pgd_linf_kernel", "linf"), ("_pgd_l2_reduce_kernel", "l2"), ("_pgd_l2_update_kernel", "l2")):
        cs = by_kernel[name]
        assert {(c["constexprs"]["BLOCK"], c["options"]["num_warps"]) for c in cs} == {tuple(pick["pgd"][norm])}
        assert {c["constexprs"]["HAS_MASK"] for c in cs} == {False, True}, name
        dims = {c["constexprs"]["MASK_DIMS"] for c in cs if c["constexprs"]["HAS_MASK"]}
        assert dims == set(range(1, pick["pgd_mask_dims"] + 1)), name
        assert {c["constexprs"]["INT64"] for c in cs} == {False, True}, name
        assert {c["signature"]["D_ptr"] for c in cs} == {"*fp32", "*bf16", "*fp16", "*fp64"}, name
    # the L2 split follows the batch size and the GPU: several SPLIT_P2 among the hot configurations
    assert len({c["constexprs"]["SPLIT_P2"] for c in by_kernel["_pgd_l2_update_kernel"] if c["hot"]}) >= 3


def test_specialization_matches_tritons_jit(enumeration):
    if enumeration["fidelity"] is None:
        pytest.skip("this triton has no create_function_from_signature to compare with")
    assert enumeration["fidelity"]["calls"] > 100
    assert enumeration["fidelity"]["diff"] == []


def test_entry_kernel_without_cases_is_an_error(enumeration):
    assert enumeration["status_missing"] == 2


def test_compiles_one_configuration_for_sm90(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "_pgd_linf_kernel", "--targets", "90", "--limit", "1",
                           "--jobs", "1", "--out", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result,) = tmp_path.glob("triton-compile-*.json")
    doc = json.loads(result.read_text())
    assert doc["triton"] and doc["commit"] and doc["targets"][0].startswith("sm_90")
    (c,) = doc["configs"]
    assert c["arch"] == 90 and not c.get("error")
    assert c["registers"] > 0 and c["spill_stores"] is not None and c["shared"] >= 0
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().count("_pgd_linf_kernel") >= 2


def _config(**kw):
    return dict(dict(kernel="supcon:_k", arch=90, hot=True, signature={"X_ptr": "*fp32"}, constexprs={}, attrs={},
                     cases=1, example={"B": 128}, registers=100, spill_stores=0, spill_loads=0, shared=0), **kw)


def test_verdict_fails_on_hot_spills_and_errors_only():
    assert tc.failures([_config()]) == []
    assert len(tc.failures([_config(spill_stores=8)])) == 1
    assert tc.flags(_config(hot=False, spill_loads=4)) == ["SPILL"]
    assert tc.failures([_config(hot=False, spill_loads=4)]) == []  # marked, not failed
    assert len(tc.failures([_config(hot=False, error="PTXASError: boom")])) == 1
    over = tc.GPUS[80]["max_shared"] + 1
    assert len(tc.failures([_config(arch=80, shared=over)])) == 1
    assert tc.failures([_config(arch=90, shared=over)]) == []  # within sm_90's larger limit
    assert tc.flags(_config(hot=False, registers=None)) == ["UNREAD"]  # resources not read: fails anywhere
    assert len(tc.failures([_config(hot=False, registers=None)])) == 1
    # no ptxas log: local memory counts as spilling
    no_log = {k: v for k, v in _config(local=16).items() if k not in ("spill_stores", "spill_loads")}
    assert tc.flags(no_log) == ["SPILL"]


def test_hot_means_inside_the_shapes_that_matter():
    assert tc.is_hot(dict(B=128, D=512)) and tc.is_hot(dict(B=1024, D=512, C=1000))
    assert not tc.is_hot(dict(B=100, D=512)) and not tc.is_hot(dict(B=128, D=100))
    assert tc.is_hot(dict(N=512, channels=3, H=224, W=224)) and not tc.is_hot(dict(N=512, H=2048, W=2048))


def test_parses_ptxas_and_cuobjdump_reports():
    log = ("ptxas info    : Compiling entry function 'other' for 'sm_90a'\n"
           "ptxas info    : Function properties for other\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers\n"
           "ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    24 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size\n")
    assert tc.parse_ptxas_log(log, "_k") == dict(stack=24, spill_stores=20, spill_loads=12, registers=255)
    dump = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function _k:\n"
            "  REG:96 STACK:8 SHARED:512 LOCAL:4 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert tc.parse_cuobjdump(dump, "_k") == dict(registers=96, stack=8, static_shared=512, local=4)
    assert tc.parse_cuobjdump(dump, "_other") == {}
