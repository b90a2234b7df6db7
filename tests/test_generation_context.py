"""Run options shared by the blocks (``ue_fast.generation.context``)."""
import pytest
import torch

from ue_fast.generation import RunContext, Timer
from ue_fast.generation.context import check_compile


def test_timer_sums_seconds_per_stage():
    t = Timer(torch.device("cpu"), sync=True)  # sync is a no-op off CUDA
    for _ in range(2):
        with t("a"):
            sum(range(10_000))
    with pytest.raises(RuntimeError):
        with t("b"):
            raise RuntimeError  # a failing stage still counts
    assert set(t.total) == {"a", "b"} and t.total["a"] > 0


def test_compile_modes_and_autocast():
    assert check_compile(None) is False and check_compile(True) is True
    assert check_compile("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ValueError, match="compile must be"):
        RunContext("cpu", compile="fastest")
    ctx = RunContext("cpu", amp=True, progress=False)
    with ctx.autocast():
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    assert ctx.bar(5, None).disable and ctx.bar(5, "x").disable  # progress off
