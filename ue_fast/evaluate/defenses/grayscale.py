"""grayscale: every training image as its luma (ISS, Liu et al. 2023)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Defense


@dataclass(frozen=True)
class Grayscale(Defense):
    """ITU-R 601 luma L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, Pillow's exact
    integer formula for ``convert("L")``, replicated to 3 channels."""

    name: ClassVar[str] = "grayscale"

    def _prepare(self, images, gen, labels):
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=images.device).view(1, 3, 1, 1)
        out = torch.empty_like(images)
        for i in range(0, len(images), 4096):  # chunks bound the int32 intermediate
            chunk = images[i:i + 4096].to(torch.int32)
            luma = ((chunk * weights).sum(1, keepdim=True) + 32768) >> 16  # [n, 1, H, W]
            out[i:i + 4096] = luma.to(torch.uint8)
        return out
