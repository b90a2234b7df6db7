"""Helpers for the benchmark suites: timing on CUDA, peak memory, recording, size switches.

Two environment switches, read once at import:

    UE_FAST_BENCH_SIZE=full|toy   full (default): the sizes results are recorded at; toy: a few
                                  seconds on a CPU, so a script that drives the suites can be
                                  run through end to end (gpu_check.sh --dry-run); toy numbers
                                  mean nothing
    UE_FAST_BENCH_COMPILE=1|0     0: skip the torch.compile variants (each compile costs tens of
                                  seconds on a small CPU)
"""
from __future__ import annotations

import os

import pytest
import torch


def _switch(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


TOY = _switch("UE_FAST_BENCH_SIZE", "full", ("full", "toy")) == "toy"
COMPILE = _switch("UE_FAST_BENCH_COMPILE", "1", ("1", "0")) == "1"


def skip_unless_compile() -> None:
    """Skip the calling torch.compile variant when UE_FAST_BENCH_COMPILE=0."""
    if not COMPILE:
        pytest.skip("torch.compile variants switched off (UE_FAST_BENCH_COMPILE=0)")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(fn, device) -> int:
    """Peak memory allocated by one call of ``fn`` beyond what was live before.

    CUDA: the caching allocator's peak. CPU: the running sum of the allocations
    and frees that torch's profiler records (torch tensors only).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start
    )
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage  # self: nested ops would count an allocation twice
        peak = max(peak, cur)
    return int(peak)


def record(benchmark, fn, device, **extra) -> None:
    """Time ``fn`` with pytest-benchmark (synchronising on CUDA) and attach extras.

    On CUDA, also records triton.testing.do_bench's median (ms), which excludes
    launch jitter from Python better than wall-clock rounds.
    """
    benchmark.extra_info.update(extra)
    benchmark.extra_info["peak_mem_bytes"] = peak_memory_bytes(fn, device)
    if torch.device(device).type == "cuda":
        import triton.testing

        benchmark.extra_info["do_bench_median_ms"] = triton.testing.do_bench(fn, return_mode="median")

    def run():
        fn()
        sync(device)

    benchmark.pedantic(run, warmup_rounds=1, rounds=_rounds(device), iterations=1)


def _rounds(device) -> int:
    if TOY:
        return 2
    return 20 if torch.device(device).type == "cuda" else 5


def demo_images(n: int, size: int = 32):
    """n demo training images (uint8 [n, 3, size, size]) and labels, classes interleaved: the
    folder is sorted by class, so a prefix would be one class. Past 1,000 they repeat."""
    from ue_fast.data import demo_dir, read_image_folder

    data = read_image_folder(demo_dir() / "train", resize=None if size == 32 else size, progress=False)
    per_class = len(data) // 10
    i = torch.arange(n) % len(data)
    idx = (i % 10) * per_class + i // 10
    return data.images[idx], data.labels[idx]
