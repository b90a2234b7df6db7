"""Python floats as kernel arguments, exact enough for float64 kernels.

Triton passes a Python float argument as float32 (compiled, and in some versions
interpreted too), so a float64 kernel would see ``1 / temperature`` or an eps
rounded to float32 (relative errors ~1e-8). A launcher passes such a value as
``split_f32(x)``, float32 ``hi`` plus the float32 remainder ``lo``, and the kernel
rebuilds it with :func:`acc_scalar`: ``hi`` alone for float32 arithmetic (the
float32 rounding torch uses for a Python scalar), ``hi + lo`` (~48 bits) for float64.
"""
from __future__ import annotations

import math

import numpy as np
import triton
import triton.language as tl


def split_f32(x: float) -> tuple[float, float]:
    """x as float32 hi (round to nearest even, like torch) and the float32 remainder lo."""
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as torch would round it
        hi = float(np.float32(x))
    return hi, (float(np.float32(x - hi)) if math.isfinite(hi) else 0.0)


@triton.jit
def acc_scalar(hi, lo, ACC: tl.constexpr):
    """The value of a ``split_f32`` pair in the accumulation dtype ``ACC``."""
    if ACC == tl.float64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)
