"""coin: random pixel-wise bilinear resampling (COIN; Wang et al., "Corrupting Convolution-based
Unlearnable Datasets with Pixel-based Image Transformations", AAAI 2025).

Every time the victim sees an image, each pixel is replaced by the image's bilinear
interpolation at a randomly displaced position: two independent displacement fields
dx, dy ~ U(-alpha, alpha) per pixel (shared by the 3 channels), the value at row i + dy[i, j],
column j + dx[i, j]. It breaks the convolution-based unlearnable examples (CUDA), whose filters
need neighbouring pixels to stay in place. As the authors' code runs it (wxldragon/COIN @
6577fa8, ``train.py`` L36-52, L76-82):

- alpha from ``severity`` 1-7: 0.8, 1.2, 1.6, 2.0, 2.4, 2.8, 3.2 (default 4: alpha 2.0);
- applied to every training image of every batch, after the random crop and flip, with fresh
  displacements each time (their DataLoader transform);
- bilinear sampling as ``scipy.ndimage.map_coordinates(order=1, mode="wrap")``: a coordinate
  beyond the image is wrapped with period side - 1 (scipy's "wrap", where the first and last
  pixels overlap; ``grid-wrap`` would be side), not clamped;
- the result clipped to [0, 1] and truncated to 8 bits (``np.uint8(x * 255)``).

What differs, and why:

- Random numbers come from torch generators (ue_fast's seeding), not NumPy's global state;
  the computation is float32 throughout (scipy interpolates in float64 and rounds to float32),
  so a value within float32 rounding of a grey level can truncate to the level below.
- The victim is ue_fast's recipe (``evaluate``), not their ResNet-18 at a constant lr 0.1
  with momentum and no weight decay for 80 epochs.
- The paper's detector (EPD) is not in the authors' repository, so it is not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...ops._checks import check_int
from .base import Defense, _check_x, _device_gen

ALPHAS = (0.8, 1.2, 1.6, 2.0, 2.4, 2.8, 3.2)  # severity 1..7 (their ``alpha`` list)


def _wrap(c: torch.Tensor, n: int) -> torch.Tensor:
    """scipy's ``mode="wrap"`` for a coordinate on an axis of ``n`` pixels: one outside
    [0, n - 1] is shifted by a multiple of n - 1 into it."""
    if n == 1:
        return torch.zeros_like(c)
    return torch.where((c < 0) | (c > n - 1), torch.remainder(c, n - 1), c)


def resample(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] sampled bilinearly at (i + dy, j + dx), dy and dx [B, H, W], coordinates
    wrapped as scipy's ``mode="wrap"``."""
    b, c, h, w = x.shape
    rows = _wrap(torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1) + dy, h)
    cols = _wrap(torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w) + dx, w)
    r0, c0 = rows.floor(), cols.floor()
    fr, fc = (rows - r0)[:, None], (cols - c0)[:, None]  # [B, 1, H, W]
    r0, c0 = r0.long(), c0.long()
    r1, c1 = (r0 + 1).clamp_max(h - 1), (c0 + 1).clamp_max(w - 1)  # weight 0 where clamped
    flat = x.reshape(b, c, h * w)

    def at(r, col):
        return flat.gather(2, (r * w + col).view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)

    top = at(r0, c0) * (1 - fc) + at(r0, c1) * fc
    bottom = at(r1, c0) * (1 - fc) + at(r1, c1) * fc
    return top * (1 - fr) + bottom * fr


@dataclass(frozen=True)
class COIN(Defense):
    """Resample every image of every batch at positions displaced by U(-alpha, alpha) pixels
    (alpha from ``severity``, 4 by default: 2.0), then clip and truncate to 8 bits."""

    severity: int = 4
    name: ClassVar[str] = "coin"

    def __post_init__(self):
        object.__setattr__(self, "severity", check_int("severity", self.severity, 1, len(ALPHAS)))

    @property
    def alpha(self) -> float:
        return ALPHAS[self.severity - 1]

    @torch.no_grad()
    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, H, W], each image resampled with fresh displacements."""
        _check_x(x, gen)
        b, _, h, w = x.shape
        noise = _device_gen(gen, x.device)
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            dx = (torch.rand(b, h, w, generator=noise, device=x.device) * 2 - 1) * self.alpha
            dy = (torch.rand(b, h, w, generator=noise, device=x.device) * 2 - 1) * self.alpha
            return resample(x, dy, dx).clamp_(0, 1).mul_(255).floor_().div_(255)

    def _loss(self, model, x, y, gen):
        _, logits = model(self.apply(x, gen).to(x.dtype))
        return F.cross_entropy(logits, y), logits
