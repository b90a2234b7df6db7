"""cutout: one zeroed square per training image and batch (DeVries & Taylor 2017)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...ops._checks import check_int
from .base import Defense, _check_x


@dataclass(frozen=True)
class Cutout(Defense):
    """Zero one ``size`` x ``size`` square per image, centred uniformly over the image
    (so clipped at borders). Rows [cy - size//2, cy - size//2 + size): exactly ``size``
    pixels for odd sizes too, where the original code cuts size - 1. Zero is black in
    pixel space (the models normalise inside), where DeVries & Taylor zero after
    normalisation (the mean colour)."""

    size: int = 16
    name: ClassVar[str] = "cutout"

    def __post_init__(self):
        object.__setattr__(self, "size", check_int("size", self.size, 1))

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, H, W], the squares zeroed."""
        _check_x(x, gen)
        b, _, h, w = x.shape
        top = torch.randint(0, h, (b, 1), generator=gen).to(x.device) - self.size // 2
        left = torch.randint(0, w, (b, 1), generator=gen).to(x.device) - self.size // 2
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_rows = (rows >= top) & (rows < top + self.size)  # [B, H]
        in_cols = (cols >= left) & (cols < left + self.size)  # [B, W]
        return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)

    def _loss(self, model, x, y, gen):
        _, logits = model(self.apply(x, gen))
        return F.cross_entropy(logits, y), logits
