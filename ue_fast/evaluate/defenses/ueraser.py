"""ueraser, ueraser-lite, ueraser-max: strong augmentations, the worst of several per
batch for a first phase (Qin et al. 2023), with kornia's augmentations as the authors'
code uses them."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...ops._checks import check_int
from .base import Defense, _check_x

KORNIA_HINT = "pip install 'ue-fast[kornia]' (kornia >= 0.7)"


def _kornia_augmentation():
    try:
        import kornia.augmentation
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError(f"UEraser's augmentations are kornia's: {KORNIA_HINT}") from e
    return kornia.augmentation


@functools.lru_cache(maxsize=None)
def pipeline():
    """UEraser's augmentation, as APBench's ``defense/ueraser.py`` (``UEraser``) builds it
    (lafeat/apbench at 9a6fb91): plasma brightness (roughness 0.3-0.7, intensity 0.5-1)
    and plasma contrast (roughness 0.3-0.7), each with p = 1; a channel shuffle with
    p = 1/2; one of kornia's TrivialAugment ops. Parameters per sample, except
    TrivialAugment's op, which kornia draws per call (per batch)."""
    K = _kornia_augmentation()
    return K.AugmentationSequential(
        K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), same_on_batch=False, p=1.0,
                                 keepdim=True),
        K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=1.0),
        K.RandomChannelShuffle(same_on_batch=False, p=0.5, keepdim=True),
        K.auto.TrivialAugment(),
    )


@dataclass(frozen=True)
class UEraser(Defense):
    """UEraser (Qin et al. 2023): per batch, ``repeats`` independent strong augmentations;
    train on the mean over samples of the largest per-sample CE, for the first ``max_epochs``
    epochs (the max-loss phase: APBench's ``--repeat_epoch``, 50 for UEraser, 0 for -Lite, 300
    for -Max; None: every epoch), then on a single augmentation per batch.

    The augmentation is kornia's pipeline with the authors' arguments (``pipeline()``;
    lafeat/apbench at 9a6fb91, ``defense/ueraser.py`` and the loop in ``train.py``; the
    paper's own repository, lafeat/ueraser at 6076a27, ``ueraser.py``, has the same
    operations). kornia draws from torch's global generator: ``augment`` seeds it from
    ``gen`` inside ``torch.random.fork_rng``, so a seed fixes the result on a device and the
    caller's global random state is left as it was.

    Differences from the authors' code, and why:

    - the plasma ops have p = 1 as in APBench; lafeat/ueraser's ``ueraser.py`` uses p = 1/2;
    - APBench switches to ``UEraser_jpeg`` (a JPEG round trip before the pipeline) for TAP
      and AR poisons; a defence does not know which poison it faces, so there is one
      pipeline, and JPEG is its own defence here (``jpeg``);
    - the logits returned for the training accuracy are each sample's worst augmentation's
      (APBench's loop reports the last repeat's); the loss is the same;
    - APBench pins kornia 0.6.12; any kornia >= 0.7 is accepted (the same operations and
      ranges; the random streams differ between versions);
    - augmentation runs without autograd and outside autocast: nothing upstream of x needs
      a gradient, and bf16 would blur the ops.
    """

    repeats: int = 5
    max_epochs: int | None = 50
    name: ClassVar[str] = "ueraser"

    def __post_init__(self):
        object.__setattr__(self, "repeats", check_int("repeats", self.repeats, 1))
        if self.max_epochs is not None:
            object.__setattr__(self, "max_epochs", check_int("max_epochs", self.max_epochs, 0))
        _kornia_augmentation()  # refused when built, before any training, if kornia is missing

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
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.autocast(x.device.type, enabled=False):
            torch.manual_seed(seed)
            return pipeline()(x).clamp_(0, 1)

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
