"""gaussian: a Gaussian blur of every training image (APBench's setting)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...ops._checks import check_int
from .base import Defense, _float_option


@dataclass(frozen=True)
class GaussianBlur(Defense):
    """Blur every image once with a ``kernel_size`` x ``kernel_size`` Gaussian of standard deviation
    ``sigma`` pixels, as torchvision's ``GaussianBlur`` (APBench: ``GaussianBlur(3, sigma=0.1)``):
    the 1-D kernel exp(-t^2 / (2 sigma^2)) at t = -(k-1)/2 .. (k-1)/2, normalised, applied along
    both axes in float32 with reflected borders, rounded to 8 bits.

    At APBench's sigma of 0.1 the neighbours' weight is exp(-50) ~ 2e-22 of the centre's: on 8-bit
    images the blur changes no pixel (the tests check it). A larger sigma does blur."""

    kernel_size: int = 3
    sigma: float = 0.1
    name: ClassVar[str] = "gaussian"

    def __post_init__(self):
        k = check_int("kernel_size", self.kernel_size, 1)
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {k}")
        object.__setattr__(self, "kernel_size", k)
        object.__setattr__(self, "sigma", _float_option("sigma", self.sigma, 0.0, math.inf))

    def kernel(self) -> torch.Tensor:
        """The normalised 1-D kernel, float32 [kernel_size]."""
        half = (self.kernel_size - 1) * 0.5
        t = torch.linspace(-half, half, self.kernel_size)
        pdf = torch.exp(-0.5 * (t / self.sigma).pow(2))
        return pdf / pdf.sum()

    def _prepare(self, images, gen, labels):
        k = self.kernel().to(images.device)
        pad = self.kernel_size // 2
        out = torch.empty_like(images)
        for i in range(0, len(images), 4096):  # chunks bound the float32 copy
            x = images[i:i + 4096].float()
            n, c, h, w = x.shape
            if pad:
                if pad >= min(h, w):
                    raise ValueError(f"kernel_size {self.kernel_size} needs images larger than {pad} pixels, got {h}x{w}")
                x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
            x = x.reshape(n * c, 1, *x.shape[2:])
            x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))  # along W, then H
            out[i:i + 4096] = x.reshape(n, c, h, w).round_().clamp_(0, 255).to(torch.uint8)
        return out
