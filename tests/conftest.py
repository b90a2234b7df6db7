"""Test set-up: Triton's CPU interpreter when there is no GPU, NaN-filled outputs,
fresh random inputs per test that can be reproduced from the printed seed."""
import os
import random
import zlib

import torch

# Under pytest-xdist (the README's command runs 2 workers), each worker computes on one
# thread, and so do the processes its tests start (OMP_NUM_THREADS is inherited): two
# workers of two threads each would contend for CI's 2 cores, and a test that compares a
# run with a resumed or distributed one needs the same thread count on both sides.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Both must be set before ue_fast.kernels is first imported (Triton decides at
# decoration time whether a kernel is compiled or interpreted).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["UE_FAST_NAN_OUTPUTS"] = "1"

import pytest  # noqa: E402

SESSION_SEED = int(os.environ.get("UE_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))

HAS_CUDA = torch.cuda.is_available()


def pytest_report_header(config):
    return [
        f"ue_fast test seed: {SESSION_SEED} (set UE_FAST_TEST_SEED to reproduce)",
        f"CUDA: {HAS_CUDA}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}",
    ]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    """A CPU torch.Generator seeded per test from the session seed: fresh inputs
    every run, reproducible with UE_FAST_TEST_SEED."""
    g = torch.Generator()
    g.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture
def triton_device():
    """Where Triton kernels run in this session: the GPU, else the CPU interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


# Tolerances by dtype for comparisons against a float64 reference.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
