"""mixup and cutmix: each batch mixed with a shuffled copy of itself (Zhang et al. 2018;
Yun et al. 2019), the loss mixed in the same proportion."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Defense, _beta, _check_x, _float_option


@dataclass
class MixedBatch:
    """A mixed batch: x [B, 3, H, W]; sample i mixes itself (weight ``lam``) with
    sample ``perm[i]`` (weight 1 - lam); ``box`` (top, bottom, left, right) is the
    pasted region for CutMix, None for Mixup."""

    x: torch.Tensor
    perm: torch.Tensor
    lam: float
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class _Mix(Defense):
    alpha: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "alpha", _float_option("alpha", self.alpha, 0.0, math.inf))

    def mix(self, x: torch.Tensor, gen: torch.Generator) -> MixedBatch:
        """x [B, 3, H, W] -> the mixed batch."""
        _check_x(x, gen)
        return self._mix(x, gen)

    def _loss(self, model, x, y, gen):  # lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])
        m = self._mix(x, gen)
        _, logits = model(m.x)
        return m.lam * F.cross_entropy(logits, y) + (1 - m.lam) * F.cross_entropy(logits, y[m.perm]), logits


@dataclass(frozen=True)
class Mixup(_Mix):
    """x_mix = lam x + (1 - lam) x[perm], lam ~ Beta(alpha, alpha), one lam per batch."""

    name: ClassVar[str] = "mixup"

    def _mix(self, x, gen):
        lam = _beta(self.alpha, gen)
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        return MixedBatch(lam * x + (1 - lam) * x[perm], perm, lam)


@dataclass(frozen=True)
class CutMix(_Mix):
    """One box per batch, Yun et al.'s ``rand_bbox``: side ratio sqrt(1 - lam),
    lam ~ Beta(alpha, alpha), centre uniform, clipped at the borders; then lam is
    reset to 1 - box area / image area, the exact share of the sample's own pixels."""

    name: ClassVar[str] = "cutmix"

    def _mix(self, x, gen):
        h, w = x.shape[2:]
        lam = _beta(self.alpha, gen)
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = (int(torch.randint(0, n, (1,), generator=gen)) for n in (h, w))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
        return MixedBatch(mixed, perm, lam, (top, bottom, left, right))
