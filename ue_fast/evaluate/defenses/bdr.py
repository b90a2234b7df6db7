"""bdr: bit-depth reduction of every training image (APBench's setting)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...ops._checks import check_int
from .base import Defense


@dataclass(frozen=True)
class BitDepthReduction(Defense):
    """Keep the ``bits`` most significant bits of every 8-bit value (posterize, Pillow's
    ``ImageOps.posterize`` and torchvision's ``RandomPosterize(bits, p=1)``; APBench: 2 bits)."""

    bits: int = 2
    name: ClassVar[str] = "bdr"

    def __post_init__(self):
        object.__setattr__(self, "bits", check_int("bits", self.bits, 1, 8))

    def _prepare(self, images, gen, labels):
        return images & (0xFF << (8 - self.bits) & 0xFF)
