"""Validation at the public boundary of the ops; kernels assume validated input."""
from __future__ import annotations

import math
import numbers

import torch


def check_features(features, name: str = "features") -> None:
    """``features`` is a floating tensor of shape [B, D] with B, D >= 1."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape [B, D], got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(features.shape)})")
    if features.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {tuple(features.shape)})")


def check_labels(labels, features: torch.Tensor, num_classes: int | None = None, name: str = "labels") -> None:
    """``labels`` is an integer tensor [B] on the features' device, in [0, num_classes) if given.

    The range check reads two numbers back from the device (one host sync); under
    ``torch.compile`` that would break the graph, so there it is skipped (the ops'
    own bounds checks, a RuntimeError, stand in).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got shape {tuple(labels.shape)}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but features has batch size {features.shape[0]}"
        )
    if labels.device != features.device:
        raise ValueError(f"{name} is on {labels.device} but features is on {features.device}")
    if num_classes is not None and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(labels)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must lie in [0, {num_classes}), found {bad}")


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` is an int (bool refused: TypeError) in [lo, hi] (ValueError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_real(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` is a finite real number (a Python number or a 0-d tensor).

    Under ``torch.compile`` a float that changed between calls is symbolic, which this
    cannot trace: there ``value`` passes unchecked, and the ops check the value they run with.
    """
    if torch.compiler.is_compiling():
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value
