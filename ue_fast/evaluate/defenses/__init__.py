"""Defences against unlearnable examples, applied while a victim network trains.

A defence acts once on the uint8 training set before training (``prepare``:
jpeg, grayscale) or on every cropped and flipped float batch (``loss``: the rest):

    defense = get_defense("adv-train", eps=4 / 255)
    images = defense.prepare(images, gen)             # [N, 3, H, W] uint8; identity here
    loss, logits = defense.loss(model, x, y, gen)     # x [B, 3, H, W] in [0, 1], y [B]

============  ==============================================================
none          plain cross-entropy
jpeg          Pillow JPEG round trip at ``quality`` 10 (ISS, Liu et al. 2023)
grayscale     ITU-R 601 luma as Pillow's ``convert("L")``, 3 channels (ISS)
gaussian      ``kernel_size`` 3 Gaussian blur, ``sigma`` 0.1 (APBench's setting)
bdr           bit-depth reduction to ``bits`` 2 (posterize; APBench's setting)
cutout        one ``size`` 16 zero square per image (DeVries & Taylor 2017)
cutmix        Beta(``alpha`` 1) box pasted from a shuffled batch (Yun et al. 2019)
mixup         Beta(``alpha`` 1) convex combination (Zhang et al. 2018)
adv-train     PGD-``steps`` 10 AT in ``norm`` linf (or l2), ``eps`` 8/255, step eps/4
              (Madry et al. 2018), the step by ``ue_fast.pgd_step_``
ueraser-lite  one strong augmentation per batch (Qin et al. 2023; ``max_epochs`` 0)
ueraser       worst of ``repeats`` 5 strong augmentations for the first ``max_epochs``
              50 epochs, then one (APBench's ``--repeat_epoch 50``)
ueraser-max   the same for ``max_epochs`` 300 epochs (APBench's default)
op            orthogonal projection: a linear model fitted to the training set,
              its class directions projected out of every image (Sandoval-Segura
              et al. 2023)
coin          every pixel resampled bilinearly at a U(-2, 2)-pixel displacement
              (``severity`` 4), per image and batch (COIN, Wang et al. 2025)
dvae          two VAEs trained ``epochs`` 60 each on the training set purify it
              (D-VAE, Yu et al. 2024): clamp(x - p), then the reconstruction
============  ==============================================================

One file per defence in this package, and a line in ``_REGISTRY`` below: adding one is a
file and a registry line, as for methods. ``prepare`` receives the labels (read only: ``op``
fits to them).

A defence that changes with the epoch (UEraser's max-loss phase) gives the victim loop
the defence of each epoch through ``at_epoch(epoch)``.

Randomness: per-sample parameters come from ``gen`` (a CPU generator) and are
moved to x's device, as in ``crop_flip``; per-pixel noise (PGD's random start)
from a generator on x's device seeded from ``gen``, so no noise crosses the bus.
UEraser's augmentations are kornia's (the extra ``ue-fast[kornia]``), which draw
from torch's global generators: it seeds them from ``gen`` inside
``torch.random.fork_rng``. A seed fixes the result on a given device.
"""
from __future__ import annotations

from dataclasses import fields

from .adv_train import AdversarialTraining
from .base import Defense
from .bdr import BitDepthReduction
from .coin import COIN
from .cutout import Cutout
from .dvae import DVAEPurification
from .gaussian import GaussianBlur
from .grayscale import Grayscale
from .jpeg import JPEG
from .mix import CutMix, MixedBatch, Mixup
from .op import OrthogonalProjection
from .ueraser import UEraser, UEraserLite, UEraserMax

__all__ = ["COIN", "DEFENSES", "JPEG", "AdversarialTraining", "BitDepthReduction", "CutMix", "Cutout", "DVAEPurification",
           "Defense",
           "GaussianBlur", "Grayscale", "MixedBatch", "Mixup", "OrthogonalProjection", "UEraser", "UEraserLite",
           "UEraserMax", "check_options", "get_defense"]

# name -> class, in the order of the table above (the CLI's choices and the report's default order)
_REGISTRY = {cls.name: cls for cls in (
    Defense,
    JPEG,
    Grayscale,
    GaussianBlur,
    BitDepthReduction,
    Cutout,
    CutMix,
    Mixup,
    AdversarialTraining,
    UEraserLite,
    UEraser,
    UEraserMax,
    OrthogonalProjection,
    COIN,
    DVAEPurification,
)}
DEFENSES = tuple(_REGISTRY)


def get_defense(name: str, **options) -> Defense:
    """The defence ``name`` (one of ``DEFENSES``) with ``options`` (its dataclass fields,
    e.g. ``quality`` for jpeg, ``eps``/``steps``/``step_size`` for adv-train)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown defense {name!r}; choose one of {', '.join(DEFENSES)}")
    cls = _REGISTRY[name]
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"defense {name!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(allowed) or 'none'}")
    return cls(**options)


def check_options(name: str, options: dict) -> None:
    """Refuse (ValueError) options that ``get_defense(name, **options)`` would not take: an unknown
    option or a bad value, before anything is trained."""
    if not isinstance(options, dict):
        raise ValueError(f"the options of defense {name!r} must be a dict, got {options!r}")
    try:
        get_defense(name, **options)
    except TypeError as e:
        raise ValueError(str(e)) from None
