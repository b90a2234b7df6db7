"""pytest-benchmark set-up: every JSON result records the device, the versions and the commit.

Run:  pytest benchmarks --benchmark-json benchmarks/results/<device>-<date>.json
Then: python benchmarks/summarize.py benchmarks/results/<file>.json
"""
import os
import subprocess

import pytest
import torch

import floors
from _common import TOY


def _commit() -> str:
    """The checkout's commit; where there is no git checkout (a copy of the tree), UE_FAST_COMMIT if set."""
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__), text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return os.environ.get("UE_FAST_COMMIT", "unknown")


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton_version
    machine_info["commit"] = _commit()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["ceilings"] = floors.measured()  # what the floors were computed from, by device
    machine_info["bench_size"] = "toy" if TOY else "full"
    if torch.cuda.is_available():
        machine_info["device"] = torch.cuda.get_device_name()
        machine_info["cuda"] = torch.version.cuda
    else:
        machine_info["device"] = f"cpu ({os.cpu_count()} cores)"


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
