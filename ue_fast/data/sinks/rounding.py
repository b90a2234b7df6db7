"""The 8-bit output: ``255 (x + delta)`` rounded stochastically (by default: up with a
probability equal to its fraction, so a perturbation below half a grey level survives in
expectation) or to nearest, clipped to [0, 255] and to the budget."""
from __future__ import annotations

import math

import torch

ROUNDINGS = ("stochastic", "nearest")


def quantize(clean: torch.Tensor, delta: torch.Tensor, eps_255: float, rounding: str = "stochastic",
             seed: int = 0, shared: torch.Tensor | None = None) -> torch.Tensor:
    """The protected 8-bit images: ``255 (clean/255 + delta)`` rounded, clipped to [0, 255]
    and to ``floor(eps_255)`` grey levels of ``clean``.

    Args:
        clean: uint8 [N, 3, H, W]. delta: float [N, 3, H, W] in pixel units.
        rounding: "stochastic" (up with probability equal to the fraction, noise seeded by
            ``seed``; a value within 0.01 of a whole grey level counts as that level, so float
            noise on whole-level perturbations never flips them) or "nearest".
        shared: int64 [N] or None: images with the same value draw the same rounding noise
            (a class-wise method passes the labels, so one class's images keep one perturbation).
    Returns:
        uint8 [N, 3, H, W].
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return Rounder(rounding, seed, shared, tuple(delta.shape[1:]))(clean, delta, eps_255, shared)


class Rounder:
    """:func:`quantize` by consecutive chunks of rows, drawing the same noise as one call."""

    def __init__(self, rounding: str, seed: int, shared: torch.Tensor | None, row_shape):
        self.rounding = rounding
        self.gen = torch.Generator().manual_seed(seed)
        self.shared_u = None
        if rounding == "stochastic" and shared is not None:
            self.shared_u = torch.rand((int(shared.max()) + 1, *row_shape), generator=self.gen)

    def __call__(self, clean, delta, eps_255: float, shared=None) -> torch.Tensor:
        u = None
        if self.rounding == "stochastic":
            u = torch.rand(delta.shape, generator=self.gen) if self.shared_u is None else self.shared_u[shared]
        c = clean.to(torch.int16)
        return (c + self._levels(delta, u, eps_255)).clamp_(0, 255).to(torch.uint8)

    def class_levels(self, rows: torch.Tensor, eps_255: float) -> torch.Tensor:
        """int16 [C, 3, H, W]: the grey levels every image of class c gets (before clipping to
        [0, 255]) from the class-wise perturbations ``rows`` (rounding made with ``shared``)."""
        u = None
        if self.rounding == "stochastic":
            u = torch.full(rows.shape, 0.5)  # a class without images: rounded to nearest
            k = min(rows.shape[0], self.shared_u.shape[0])
            u[:k] = self.shared_u[:k]
        return self._levels(rows, u, eps_255)

    def _levels(self, delta, u, eps_255: float) -> torch.Tensor:
        v = delta.float() * 255  # [B, 3, H, W], grey levels
        if u is None:
            q = torch.round(v)
        else:
            near = torch.round(v)
            q = torch.where((v - near).abs() <= 0.01, near, torch.floor(v + u))
        lim = math.floor(eps_255 + 1e-6)
        return q.clamp_(-lim, lim).to(torch.int16)
