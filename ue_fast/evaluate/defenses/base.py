"""What every defence shares: the ``Defense`` base (no defence), the input checks, and
the helpers for options and randomness."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F


def _float_option(name: str, value, lo: float, hi: float) -> float:
    """A finite real in (lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and lo < value <= hi):
        raise ValueError(f"{name} must be in ({lo}, {hi}], got {value}")
    return float(value)


def _check_images(images, gen) -> None:
    _check_gen(gen)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [N, 3, H, W], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must have shape [N, 3, H, W] with N >= 1, got {tuple(images.shape)}")


def _check_x(x, gen) -> None:
    _check_gen(gen)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [B, 3, H, W] with B >= 1, got {tuple(x.shape)}")


def _check_batch(x, y, gen) -> None:
    _check_x(x, gen)
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        raise TypeError(f"y must be an int64 tensor [B], got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (x.shape[0],) or y.device != x.device:
        raise ValueError(f"y must have shape [{x.shape[0]}] on {x.device}, got {tuple(y.shape)} on {y.device}")


def _check_gen(gen) -> None:
    if not isinstance(gen, torch.Generator) or gen.device.type != "cpu":
        raise TypeError(f"gen must be a CPU torch.Generator, got {gen!r}")


def _device_gen(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """``gen`` itself on the CPU; elsewhere a generator on ``device`` seeded from ``gen``."""
    if device.type == "cpu":
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def _beta(alpha: float, gen: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; numpy's, seeded from gen, keeps runs reproducible.
    return float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(alpha, alpha))

@dataclass(frozen=True)
class Defense:
    """No defence: identity ``prepare``, cross-entropy ``loss``. The base of the
    others, which override ``_prepare`` / ``_loss`` (called on validated input)."""

    name: ClassVar[str] = "none"
    needs_labels: ClassVar[bool] = False  # prepare() fits something to the labelled set (op)

    def prepare(self, images: torch.Tensor, gen: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Data level, once before training: uint8 [N, 3, H, W] -> uint8 [N, 3, H, W], same device.
        ``labels`` (int64 [N]) are read, never changed; a defence with ``needs_labels`` requires them."""
        _check_images(images, gen)
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
                got = getattr(labels, "dtype", type(labels).__name__)
                raise TypeError(f"labels must be an int64 tensor [N], got {got}")
            if labels.shape != (images.shape[0],) or labels.device != images.device:
                raise ValueError(f"labels must have shape [{images.shape[0]}] on {images.device}, "
                                 f"got {tuple(labels.shape)} on {labels.device}")
            if labels.min() < 0:
                raise ValueError("labels must be class indices >= 0")
        elif self.needs_labels:
            raise ValueError(f"defense {self.name!r} fits a model to the labelled training set: pass labels")
        return self._prepare(images, gen, labels)

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        """Batch level: x float [B, 3, H, W] in [0, 1] (cropped and flipped), y int64 [B]
        -> (scalar training loss, logits [B, C] for the train accuracy)."""
        _check_batch(x, y, gen)
        return self._loss(model, x, y, gen)

    def at_epoch(self, epoch: int) -> Defense:
        """The defence for training epoch ``epoch`` (0-based): itself, unless it has phases."""
        return self

    def _prepare(self, images, gen, labels):
        return images

    def _loss(self, model, x, y, gen):
        _, logits = model(x)
        return F.cross_entropy(logits, y), logits
