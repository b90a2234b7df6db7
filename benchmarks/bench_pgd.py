"""pgd_step_ (L-inf, float32) against the unfused PyTorch sequence of the authors'
code and against torch.compile of that sequence.

The step is memory-bound: read delta, grad and clean, write delta, i.e. a floor
of 4 * numel * itemsize bytes over the copy bandwidth measured in the same run
(floors.py). On a GPU a third shape, 256 x 3 x 224 x 224 (154 MB per tensor), is
well past the L2 cache, so its floor is the one of DRAM.

Run:  pytest benchmarks/bench_pgd.py --benchmark-json benchmarks/results/<file>.json
(without TRITON_INTERPRET=1: on the CPU our op then runs its PyTorch fallback).
"""
import functools

import pytest
import torch

from _common import TOY, record, skip_unless_compile
from floors import floor, pgd_work
from ue_fast.ops import pgd_step_, pgd_step_ref_
from ue_fast.ops._dispatch import interpret_mode

EPS, ALPHA = 8 / 255, 0.8 / 255
if TOY:
    SHAPES = [(8, 3, 32, 32)]
else:
    SHAPES = [(512, 3, 32, 32), (64, 3, 224, 224)] + ([(256, 3, 224, 224)] if torch.cuda.is_available() else [])


def unfused(delta, grad, clean, eps, alpha):
    """The authors' formulation: three temporaries the size of delta."""
    delta = delta - alpha * grad.sign()
    delta = torch.clamp(delta, -eps, eps)
    return torch.clamp(clean + delta, 0, 1) - clean


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(unfused)


def _inputs(shape, device):
    g = torch.Generator(device=device).manual_seed(0)
    clean = torch.rand(shape, generator=g, device=device)
    delta = (torch.rand(shape, generator=g, device=device) * 2 - 1) * EPS
    grad = torch.randn(shape, generator=g, device=device)
    return delta, grad, clean


def _expected(delta, grad, clean):
    return pgd_step_ref_(delta.clone(), grad, clean, eps=EPS, step_size=ALPHA)


def _finish(benchmark, nbytes, device):
    """Attach the achieved bandwidth and, on CUDA, its fraction of the device's copy bandwidth."""
    info = benchmark.extra_info
    median_s = benchmark.stats.stats.median
    info["gb_per_s"] = nbytes / median_s / 1e9  # info["copy_gb_per_s"] came with the floor
    if torch.device(device).type == "cuda":
        info["gb_per_s_do_bench"] = nbytes / (info["do_bench_median_ms"] * 1e-3) / 1e9
        info["fraction_of_copy_bw"] = info["gb_per_s_do_bench"] / info["copy_gb_per_s"]


def _case(benchmark, shape, device, variant):
    delta, grad, clean = _inputs(shape, device)
    expected = _expected(delta, grad, clean)
    nbytes = 4 * delta.numel() * delta.element_size()
    if variant == "ue_fast":
        # Under TRITON_INTERPRET=1 "auto" would pick the interpreter on the CPU: minutes, not a measurement.
        backend = "torch" if interpret_mode() and torch.device(device).type == "cpu" else "auto"
        out = pgd_step_(delta.clone(), grad, clean, eps=EPS, step_size=ALPHA, backend=backend)
        torch.testing.assert_close(out, expected, rtol=0, atol=2.0**-23)  # tests check bit-exactness

        def fn():
            pgd_step_(delta, grad, clean, eps=EPS, step_size=ALPHA, backend=backend)

        extra = dict(backend=backend)
    else:
        impl = unfused
        if variant == "compiled":
            skip_unless_compile()
            impl = _compiled()
            try:
                out = impl(delta, grad, clean, EPS, ALPHA)
            except Exception as exc:  # no C++ compiler, unsupported platform, ...
                pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        else:
            out = impl(delta, grad, clean, EPS, ALPHA)
        # One ulp of values near 1: compile may reorder the float32 arithmetic.
        torch.testing.assert_close(out, expected, rtol=0, atol=2.0**-23)

        def fn():
            impl(delta, grad, clean, EPS, ALPHA)

        extra = {}
    record(benchmark, fn, device, variant=variant, shape=list(shape), dtype="float32", bytes_moved=nbytes,
           **floor(*pgd_work(delta.numel(), delta.element_size()), device), **extra)
    _finish(benchmark, nbytes, device)


def _group(shape):
    return "pgd_linf_" + "x".join(map(str, shape))


@pytest.mark.parametrize(
    "shape", [pytest.param(s, marks=pytest.mark.benchmark(group=_group(s)), id="x".join(map(str, s))) for s in SHAPES]
)
@pytest.mark.parametrize("variant", ["ue_fast", "unfused", "compiled"])
def test_pgd_linf(benchmark, shape, variant, device):
    _case(benchmark, shape, device, variant)
