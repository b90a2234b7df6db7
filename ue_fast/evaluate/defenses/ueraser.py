"""ueraser, ueraser-lite, ueraser-max: strong augmentations, the worst of several per
batch for a first phase (Qin et al. 2023)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...ops._checks import check_int
from ..augment import GEOMETRIC, PHOTOMETRIC, plasma, trivial_augment
from .base import Defense, _check_x, _device_gen


@dataclass(frozen=True)
class UEraser(Defense):
    """UEraser (Qin et al. 2023): per batch, ``repeats`` independent strong augmentations;
    train on the mean over samples of the largest per-sample CE, for the first ``max_epochs``
    epochs (the max-loss phase: APBench's ``--repeat_epoch``, 50 for UEraser, 0 for -Lite, 300
    for -Max; None: every epoch), then on a single augmentation per batch.

    Each augmentation, per sample: plasma brightness x + i (2P - 1), i ~ U(0, 1), and
    plasma contrast (x - 1/2) 4P + 1/2, P a fractal map per channel with roughness
    ~ U(0.1, 0.7) (kornia's defaults as the paper uses them, p = 1 as in APBench); a channel
    permutation with p = 1/2; then one TrivialAugment op at a uniform magnitude:
    auto-contrast, equalize, posterize (4-8 bits kept), solarize (threshold in
    [0, 1]), contrast / brightness / sharpness (Pillow's enhance, factor in
    [0.1, 1.9]), rotate (+-30 deg), shear x/y (+-0.3), translate x/y (+-half the side).

    Differences from the paper's kornia pipeline: plasma maps are octave noise, not
    diamond-square fractals (same [0, 1] range, same role of roughness); the op is
    drawn per sample (TrivialAugment's own rule) where kornia draws one per batch
    call. Augmentation runs without autograd: nothing upstream of x needs a gradient.
    """

    repeats: int = 5
    max_epochs: int | None = 50
    name: ClassVar[str] = "ueraser"

    def __post_init__(self):
        object.__setattr__(self, "repeats", check_int("repeats", self.repeats, 1))
        if self.max_epochs is not None:
            object.__setattr__(self, "max_epochs", check_int("max_epochs", self.max_epochs, 0))

    def at_epoch(self, epoch: int) -> Defense:
        """Worst of ``repeats`` during the first ``max_epochs`` epochs (None: always), then a
        single augmentation per batch, as APBench's ``--repeat_epoch``."""
        if self.max_epochs is None or epoch < self.max_epochs or self.repeats == 1:
            return self
        return dataclasses.replace(self, repeats=1)

    @torch.no_grad()
    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One random strong augmentation: [B, 3, H, W] in [0, 1] -> [B, 3, H, W] in [0, 1]."""
        _check_x(x, gen)
        b, c = x.shape[:2]
        u = torch.rand(b, 6, generator=gen).to(x.device, x.dtype)  # per-sample parameters
        channel_perm = torch.rand(b, c, generator=gen).argsort(1).to(x.device)
        channel_perm = torch.where((u[:, 3] < 0.5)[:, None], channel_perm, torch.arange(c, device=x.device))
        op = torch.randint(0, len(PHOTOMETRIC) + len(GEOMETRIC), (b,), generator=gen).to(x.device)
        noise_gen = _device_gen(gen, x.device)
        with torch.autocast(x.device.type, enabled=False):  # the victim loop's bf16 autocast would blur ops
            bright = plasma(x.shape, 0.1 + 0.6 * u[:, 1], noise_gen, x)
            x = (x + u[:, 0].view(-1, 1, 1, 1) * (2 * bright - 1)).clamp_(0, 1)
            x = ((x - 0.5) * 4 * plasma(x.shape, 0.1 + 0.6 * u[:, 2], noise_gen, x) + 0.5).clamp_(0, 1)
            x = x.gather(1, channel_perm[:, :, None, None].expand_as(x))
            return trivial_augment(x, op, u[:, 4], u[:, 5] < 0.5)

    def _loss(self, model, x, y, gen):  # the logits returned: each sample's worst augmentation
        losses, logits = [], []
        for _ in range(self.repeats):
            _, out = model(self.augment(x, gen))
            losses.append(F.cross_entropy(out, y, reduction="none"))
            logits.append(out)
        worst, which = torch.stack(losses).max(0)  # [B]
        return worst.mean(), torch.stack(logits)[which, torch.arange(len(x), device=x.device)]


@dataclass(frozen=True)
class UEraserLite(UEraser):
    """UEraser-Lite: one strong augmentation per batch from the first epoch (``max_epochs`` 0)."""

    max_epochs: int | None = 0
    name: ClassVar[str] = "ueraser-lite"


@dataclass(frozen=True)
class UEraserMax(UEraser):
    """UEraser-Max: the worst of ``repeats`` for ``max_epochs`` 300 epochs (APBench's default)."""

    max_epochs: int | None = 300
    name: ClassVar[str] = "ueraser-max"
