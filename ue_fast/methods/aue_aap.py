"""AUE and AAP (Wang, Zhu & Gao, NeurIPS 2024): EM and AP under contrastive-style augmentations.

"Efficient Availability Attacks against Supervised and Contrastive Learning
Simultaneously" (arXiv:2402.04010). Supervised error-minimising / adversarial poisons made
under the strong augmentations of contrastive learning (random resized crop, flip, colour
jitter, grayscale: ``ue_fast.generation.transforms.contrastive_augment``, differentiable,
drawn per sample at every use) also hold against contrastive learners. Authors' code:
github.com/EhanW/AUE-AAP @ 64fb25f (``aue.py``, ``aap.py``, ``utils.py`` ``Augment``,
``dataloaders.py``, ``example.sh``).

AUE (``aue.py``), per round r = 1..``epochs`` (60):

1. train the surrogate one epoch (batches of 128, every batch) on ``A(x + delta)``, A the
   augmentation at ``strength`` (0.6: their CIFAR-10 script; the argparse default is 1.0);
   SGD lr 0.1 cosine per round towards 1e-6 (their LambdaLR's floor factor ``1e-6 / lr``),
   momentum 0.9, weight decay 1e-4;
2. surrogate in eval mode, every image once (batches of 128): ``pgd_steps`` = 5 sign steps of
   eps/10 descending ``CE(f(A(x + delta)), y)``, A redrawn at every step, from the stored
   delta (zero at the start); no stopping criterion (all 60 rounds run).

AAP (``aap.py``):

1. train the surrogate on the clean data for 40 epochs under the augmentation at
   ``pretrain_strength`` (0.4: their CIFAR-10 script; argparse 1.0), batches of 128, SGD lr 0.5,
   momentum 0.9, weight decay 1e-4, 10 epochs of linear warm-up then cosine towards 1e-6 (per
   epoch);
2. frozen (eval mode), from zero, 250 sign steps of ``2.5 eps / 250`` per image on
   ``CE(f(A(x + delta)), (y + 1) mod C)`` descended (targeted, their default; ``targeted=False``:
   ``CE(f(A(x + delta)), y)`` ascended), A at ``strength`` (0.4) redrawn at every step.

Still differs from the authors' code, and why:

- one implementation of the augmentation for both methods' every use (theirs: kornia on the GPU,
  and for AAP's clean training torchvision's PIL version, whose crop scale has no 0.05 floor
  and whose jitter probability has no 0.99 cap; neither bound binds at strengths <= 0.94);
- a crop box larger than the image in one dimension is clipped to it (kornia and torchvision
  redraw it, up to 10 times); the colour jitter's order of operations is drawn per sample
  (kornia: one order per call, shared by the batch; torchvision: per image);
- AUE's batches are drawn from a fresh shuffle every round for the training and for the
  perturbation (theirs too: two shuffled loaders); AAP's attack batches are ``poison_batch_size``
  (their batch 128: every sample's loss is its own, so the size does not change the result).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..generation import Stage
from ..generation.transforms import CONTRASTIVE_DRAWS, contrastive_augment
from .ap import AP, APConfig
from .base import SurrogateMethod
from .em import EM
from .settings import SurrogateConfig, bool_setting, int_setting, real_setting


def _strength(name: str, value) -> None:
    real_setting(name, value, 0.0, 1.0 / 0.9, closed=True)  # 1 - 0.9 s >= 0 (the crop scale floor is 0.05)


class _Augmented:
    """The augmentation at a strength, drawn per sample from the run's generator."""

    def augment(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        return contrastive_augment(x, self.data.draws().rand(len(x), CONTRASTIVE_DRAWS), strength)


# ----------------------------------------------------------------------------- AUE
@dataclass
class AUEConfig(SurrogateConfig):
    """Settings of an AUE run; defaults are the authors' CIFAR-10 settings (see the module docstring)."""

    epochs: int = 60
    pgd_steps: int = 5
    alpha: float | None = None  # None: eps / 10
    batch_size: int = 128
    poison_batch_size: int = 128
    weight_decay: float = 1e-4
    strength: float = 0.6
    train_steps: int | None = None  # surrogate batches per round; None: one epoch (theirs: 391 = one epoch)

    def default_alpha(self) -> float:
        return self.eps / 10

    def validate(self) -> None:
        super().validate()
        _strength("strength", self.strength)
        if self.train_steps is not None:
            int_setting("train_steps", self.train_steps)


class AUE(_Augmented, SurrogateMethod):
    """Augmented unlearnable examples: EM's min-min under the contrastive augmentation."""

    name = "aue"
    distributed = True
    config_class = AUEConfig
    # cpu-small: a cnn-small surrogate, 15 rounds, batches of 64.
    presets = {"paper": {}, "cpu-small": dict(arch="cnn-small", epochs=15, batch_size=64, poison_batch_size=256)}

    def stages(self):
        return [Stage("rounds", self.config.epochs, self.round)]

    def augmented(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.augment(x, self.config.strength)

    def round(self, r: int) -> dict:
        cfg, data = self.config, self.data
        batches = data.shuffled(cfg.batch_size, merge_single=True)
        if cfg.train_steps is not None:
            batches = batches[:cfg.train_steps]
        train = self.surrogate.fit(batches, self.perturbed_inputs(transform=self.augmented),
                                   lr=cfg.learning_rate(r), desc=f"round {r}: surrogate")
        poison = self.pgd.per_batch(data.shuffled(cfg.poison_batch_size), self.loss, steps=cfg.pgd_steps,
                                    step_size=cfg.alpha, inputs=lambda x, d, y: self.augmented(x + d, y),
                                    desc=f"round {r}: PGD x{cfg.pgd_steps}")
        return dict(lr=cfg.learning_rate(r), step_size=cfg.alpha, **train, **poison)

    loss = staticmethod(EM.loss)  # CE at the true labels


# ----------------------------------------------------------------------------- AAP
@dataclass
class AAPConfig(APConfig):
    """Settings of an AAP run; defaults are the authors' CIFAR-10 settings (see the module docstring)."""

    pgd_steps: int = 250
    alpha: float | None = None  # None: 2.5 eps / pgd_steps
    batch_size: int = 128
    lr: float = 0.5
    weight_decay: float = 1e-4
    nesterov: bool = False
    pretrain_epochs: int = 40
    pretrain_schedule: str = "warmup-cosine"
    pretrain_warmup: int = 10  # epochs of linear warm-up
    pretrain_strength: float = 0.4  # the clean training's augmentation
    strength: float = 0.4  # the attack's augmentation
    targeted: bool = True  # descend CE towards (y + 1) mod C; False: ascend CE at y
    restarts: int = 1
    init: str = "zero"

    def default_alpha(self) -> float:
        return 2.5 * self.eps / self.pgd_steps

    def validate(self) -> None:
        if self.pretrain_schedule == "warmup-cosine":  # APConfig knows the others
            self.pretrain_schedule, checked = "cosine", True
        else:
            checked = False
        try:
            super().validate()
        finally:
            if checked:
                self.pretrain_schedule = "warmup-cosine"
        int_setting("pretrain_warmup", self.pretrain_warmup, 0)
        _strength("pretrain_strength", self.pretrain_strength)
        _strength("strength", self.strength)
        bool_setting("targeted", self.targeted)

    def pretrain_lr(self, epoch: int) -> float:
        """Linear warm-up over ``pretrain_warmup`` epochs, then cosine towards ``lr_min`` (1e-6; their
        LambdaLR ``cosine_annealing`` with warm-up and floor factor 1e-6 / lr, stepped per epoch)."""
        if self.pretrain_schedule != "warmup-cosine":
            return super().pretrain_lr(epoch)
        wu, p = self.pretrain_warmup, self.pretrain_epochs
        if epoch <= wu:
            return self.lr * epoch / wu
        t = (epoch - 1 - wu) / max(p - wu, 1)
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * t))


class AAP(_Augmented, AP):
    """Augmented adversarial poisoning: AP/TAP against a surrogate trained, and attacked, under the
    contrastive augmentation."""

    name = "aap"
    config_class = AAPConfig
    # cpu-small: a cnn-small surrogate, 10 clean epochs (2 of warm-up), 20 steps of 1/255.
    presets = {"paper": {}, "cpu-small": dict(arch="cnn-small", pretrain_epochs=10, pretrain_warmup=2, pgd_steps=20,
                                              alpha=1 / 255, batch_size=64)}

    @property
    def maximize(self) -> bool:
        return not self.config.targeted

    def pretrain_epoch(self, e: int) -> dict:
        cfg = self.config
        aug = (lambda x, y: self.augment(x, cfg.pretrain_strength)) if cfg.pretrain_augment else None
        train = self.surrogate.fit(self.data.shuffled(cfg.batch_size, merge_single=True), self.clean_inputs(aug),
                                   lr=cfg.pretrain_lr(e), desc=f"clean epoch {e}")
        return dict(lr=cfg.pretrain_lr(e), **train)

    def augmented(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.augment(x, self.config.strength)

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels + 1) % self.num_classes if self.config.targeted else labels
