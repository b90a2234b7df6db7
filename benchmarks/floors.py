"""Roofline floors of the benchmarked ops: the device's measured ceilings and each op's necessary work.

A floor is a time an op cannot beat on this device:

    floor_s = max(bytes it must move / copy bandwidth, matrix FLOPs it must do / bf16 matmul rate)

Both ceilings are measured once per process, on the device the benchmarks run on:
the copy bandwidth as bytes read + written per second by a large device-to-device
copy (1 GiB on a GPU), the matmul rate as the FLOP/s of an 8192^3 bf16 product (on a
GPU; 1024^3 on a CPU). The bf16 rate is the fastest matrix unit, so for float32 ops the
floor is optimistic on purpose: it bounds what any precision could reach.

Work per op, at the shape benchmarked (float32 unless ``itemsize`` says otherwise):

- supcon_loss fwd+bwd: the Gram matrix Z Z^T and the W Z of the backward, 4 B^2 D
  FLOPs; reads the features and writes their gradient, 2 B D itemsize bytes.
- centroid_loss fwd+bwd: the C x C centroid cosines, forward and backward, 6 C^2 D
  FLOPs; reads the features and writes their gradient, 2 B D itemsize bytes.
- pgd_step_: elementwise only; reads delta, grad and clean, writes delta, 4 numel itemsize bytes.
- class_covariance: the per-class Gram matrices, 2 N D^2 FLOPs (as one GEMM computes
  them); reads the features and labels, writes means [C, D] and covariances [C, D, D]
  in float32.
"""
from __future__ import annotations

import functools
import time

import torch


def _median_s(fn, device: torch.device, reps: int = 5) -> float:
    """Median seconds of ``fn()``: triton's do_bench on CUDA, wall clock after a warm-up on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


_measured: dict[str, dict] = {}


@functools.lru_cache(maxsize=None)
def ceilings(device: str) -> dict:
    """Copy bandwidth (bytes/s, read + written) and bf16 matmul rate (FLOP/s) measured on ``device``."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    nbytes = 2**30 if cuda else 64 * 2**20
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    copy_s = _median_s(lambda: y.copy_(x), dev)
    del x, y
    n = 8192 if cuda else 1024
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=dev, dtype=torch.bfloat16)  # random data: zeros run faster
    b = torch.randn(n, n, generator=g, device=dev, dtype=torch.bfloat16)
    mm_s = _median_s(lambda: a @ b, dev)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    out = dict(device=torch.cuda.get_device_name(dev) if cuda else "cpu", copy_bytes=nbytes,
               copy_bytes_per_s=2 * nbytes / copy_s, matmul_n=n, bf16_flops_per_s=2 * n**3 / mm_s)
    _measured[device] = out
    return out


def measured() -> dict[str, dict]:
    """The ceilings measured so far in this process, by device (for the results' machine_info)."""
    return dict(_measured)


def floor(flops: float, nbytes: float, device) -> dict:
    """The floor of an op doing ``flops`` matrix FLOPs and moving ``nbytes`` bytes on ``device``,
    with its parts, as benchmark extra_info (``floor_s`` is what summarize.py divides by)."""
    c = ceilings(str(torch.device(device)))
    mem_s = nbytes / c["copy_bytes_per_s"]
    math_s = flops / c["bf16_flops_per_s"]
    return dict(floor_s=max(mem_s, math_s), floor_bytes_s=mem_s, floor_flops_s=math_s,
                floor_bound="memory" if mem_s >= math_s else "compute", work_flops=flops, work_bytes=nbytes,
                copy_gb_per_s=c["copy_bytes_per_s"] / 1e9, bf16_tflops=c["bf16_flops_per_s"] / 1e12)


def supcon_work(B: int, D: int, itemsize: int = 4) -> tuple[float, float]:
    return 4 * B * B * D, 2 * B * D * itemsize


def centroid_work(B: int, D: int, C: int, itemsize: int = 4) -> tuple[float, float]:
    return 6 * C * C * D, 2 * B * D * itemsize


def pgd_work(numel: int, itemsize: int = 4) -> tuple[float, float]:
    return 0.0, 4 * numel * itemsize


def covariance_work(N: int, D: int, C: int, itemsize: int = 4) -> tuple[float, float]:
    return 2 * N * D * D, N * D * itemsize + 8 * N + 4 * (C * D + C * D * D)
