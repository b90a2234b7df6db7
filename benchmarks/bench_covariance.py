"""class_covariance at N = 50,000, D = 512: our op vs a per-class torch.cov loop vs
the pure-PyTorch reference.

Floor (floors.py): the per-class Gram matrices are 2 N D^2 FLOPs (26 GFLOP here)
whatever C is, at the measured bf16 matmul rate, or the features read and the
C x D x D covariances written at the copy bandwidth (105 MB at C = 100), whichever
is longer. ``matmul_rate_ratio`` compares with what torch.matmul reaches on the
same work in float32, one [D, N] @ [N, D] product in the same run: 1.0 is as fast
as a single large GEMM.
"""
import time

import pytest
import torch

from _common import TOY, record, sync
from floors import covariance_work, floor
from ue_fast import class_covariance
from ue_fast.ops import class_covariance_ref

N, D = (2_000, 512) if TOY else (50_000, 512)
GRAM_FLOPS = 2 * N * D * D
CLASSES = [
    pytest.param(C, id=f"C{C}", marks=pytest.mark.benchmark(group=f"class_covariance N={N} D={D} C={C}"))
    for C in ((10,) if TOY else (10, 100))
]


def per_class_loop(features, labels, num_classes):
    """The plain formulation: boolean-mask each class, torch.cov its rows."""
    counts = torch.bincount(labels, minlength=num_classes)
    means, covs = [], []
    for c in range(num_classes):
        rows = features[labels == c]  # [n_c, D]
        means.append(rows.mean(0))
        covs.append(torch.cov(rows.T))
    return counts, torch.stack(means), torch.stack(covs)


IMPLS = {
    "ue_fast": class_covariance,
    "per_class_torch_cov": per_class_loop,
    "ref": class_covariance_ref,
}

_inputs, _expected, _matmul_s = {}, {}, {}


def inputs(C, device):
    if (C, device) not in _inputs:
        g = torch.Generator().manual_seed(C)
        x = torch.randn(N, D, generator=g)
        y = torch.randint(0, C, (N,), generator=g)
        _inputs[(C, device)] = (x.to(device), y.to(device))
    return _inputs[(C, device)]


def expected(C, device):
    """float64 result of the reference, computed once per C."""
    if (C, device) not in _expected:
        x, y = inputs(C, device)
        _expected[(C, device)] = class_covariance_ref(x.double(), y, C)
    return _expected[(C, device)]


def matmul_seconds(device):
    """Median time of torch.matmul on the same total work: [D, N] @ [N, D] float32."""
    if device not in _matmul_s:
        x, _ = inputs(10, device)
        xt = x.T.contiguous()  # [D, N]
        if torch.device(device).type == "cuda":
            import triton.testing

            _matmul_s[device] = triton.testing.do_bench(lambda: xt @ x, return_mode="median") / 1e3
        else:
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                xt @ x
                sync(device)
                times.append(time.perf_counter() - t0)
            _matmul_s[device] = sorted(times[1:])[1]  # median of 3 after a warm-up
    return _matmul_s[device]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("C", CLASSES)
def test_class_covariance(benchmark, device, C, impl):
    x, y = inputs(C, device)
    fn = IMPLS[impl]
    counts, means, cov = fn(x, y, C)
    e_counts, e_means, e_cov = expected(C, device)
    torch.testing.assert_close(counts, e_counts)
    torch.testing.assert_close(means.double(), e_means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cov.double(), e_cov, rtol=1e-4, atol=1e-5)

    matmul_s = matmul_seconds(device)
    record(benchmark, lambda: fn(x, y, C), device, variant=impl, op="class_covariance",
           N=N, D=D, C=C, dtype="float32", matmul_s=matmul_s, matmul_gflops=GRAM_FLOPS / matmul_s / 1e9,
           **floor(*covariance_work(N, D, C), device))
    median = benchmark.stats.stats.median
    benchmark.extra_info["gflops"] = GRAM_FLOPS / median / 1e9
    benchmark.extra_info["matmul_rate_ratio"] = matmul_s / median  # 1.0: as fast as one big GEMM
