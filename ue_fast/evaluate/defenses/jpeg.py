"""jpeg: a Pillow JPEG round trip of every training image (ISS, Liu et al. 2023: quality 10)."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ...ops._checks import check_int
from .base import Defense


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W, 3] uint8 after a Pillow JPEG encode and decode."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB"))


@dataclass(frozen=True)
class JPEG(Defense):
    """Re-encode every image as JPEG at ``quality`` (Pillow's default 4:2:0 chroma subsampling)."""

    quality: int = 10
    name: ClassVar[str] = "jpeg"

    def __post_init__(self):
        object.__setattr__(self, "quality", check_int("quality", self.quality, 1, 100))

    def _prepare(self, images, gen, labels):
        # One image per call: a mosaic would be faster but libjpeg's chroma
        # upsampling blends across tile borders. ~0.2 ms per 32x32 image; a
        # thread pool does not help (the GIL dominates at this size).
        hwc = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
        out = np.stack([_jpeg_round_trip(im, self.quality) for im in hwc])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)
