r"""Bayes-error unlearnable examples (Zhang, Sun, Lim, Zhang, AAAI 2026, arXiv:2511.08191).

"Towards Provably Unlearnable Examples via Bayes Error Optimisation": perturb the images
so that a kernel estimate of the Bayes error of their features (``ue_fast.ops.bayes``:
leave-one-out Gaussian-kernel class posteriors, bandwidth ``sigma``) is as large as possible.

Algorithm (authors' code: github.com/cat-claws/unlearnable ``cifar10-retrain.py``, with the
estimator of github.com/cat-claws/bayes-error-local-averaging and the optimiser loop of
github.com/cat-claws/torchadversarial ``attack.py``), round r = 1..``epochs``:

1. a surrogate (fresh weights) trains ``retrain_epochs`` = 30 epochs on the current
   ``x + delta`` (SGD lr 0.1 cosine to 0 over the 30 epochs, momentum 0.9, weight decay
   5e-4, batch 128, no augmentation);
2. frozen, it gives the features of the whole set; E is estimated on all N of them at once
   (features divided by their largest absolute entry, sigma 0.3), and ``x + delta`` takes one
   AdamW step ascending it (lr 1e-3, betas (0.9, 0.999), weight decay 0.01: torch's
   defaults, one optimiser state for the whole run), then is projected to the eps ball
   around x (8/255) and to [0, 1].

delta starts at zero, so round 1's surrogate trains on clean data. The whole-set step: the
features are computed batch by batch without a graph, E and dE/df come from them, and the
gradient is back-propagated batch by batch (``poison_batch_size`` only bounds memory);
the AdamW moments are per element, so each batch updates its own rows. Their script runs
2,000 rounds (its log shows 190); ``epochs`` is that number here.

Other schedules, by setting: ``ascent="sign"`` takes ``pgd_steps`` sign steps of ``alpha``
per round instead of AdamW; ``whole_set=False`` (with ``ascent="sign"``) estimates E per
shuffled batch of ``poison_batch_size``; ``retrain_epochs=0`` keeps one surrogate that
trains one epoch per round (cosine lr over the rounds), or none with ``train_surrogate=False``;
``pretrain_epochs`` clean epochs first; ``sigma=None`` takes the median heuristic per estimate
(over at most 4,096 samples) and ``feature_scale="l2"`` unit-normalises the features.

Still differs from the authors' code, and why:

- the surrogate trains on shuffled batches (theirs in CIFAR-10's fixed order, which is
  already random; an image folder is sorted by class) and from weights seeded by the seed
  and the round (theirs unseeded);
- no ``+1e-8`` in the posterior's denominator (``ue_fast.ops.bayes``: it turns far-apart
  samples into posterior 0 and gradient 0);
- the model normalises its input by CIFAR-10 statistics (theirs takes [0, 1] images), the
  model zoo shared by every method.

Measurements below (before 2026-11-28) are of the earlier default, this project's bi-level
schedule: 100 rounds of one surrogate epoch and 10 sign steps of 0.5/255 on per-batch
estimates (``ascent="sign", whole_set=False, retrain_epochs=0, epochs=100, pgd_steps=10``).

Measured on CPU (cnn-small surrogate and 15-epoch victim, 1,000 demo images, test on the
200 demo test images, victim seeds 0 / 1; clean 0.420 / 0.460): 5 rounds x 4 steps of 1/255
from scratch 0.425 / 0.400; 5 clean epochs then 10 frozen steps of 1/255 0.400 / 0.375,
with ``sigma=None, feature_scale="l2"`` 0.365 / 0.390. Mixed (500 clean + the other 500
protected, the last config) vs the clean 500 alone: 0.445 vs 0.315 (seed 0), 0.395 vs
0.420 (seed 1), i.e. within victim noise: the paper's mixed-data property (CIFAR-10 50/50:
69.68% vs 91.16% clean-only, full schedule on ResNet-18) is not reproduced at this scale.
With a 30-epoch victim (clean 0.455, seed 0): 5 clean epochs then 10 frozen steps of 1/255,
median/l2 0.41, 20 steps 0.425, 20 steps with sigma 0.3 and max scaling 0.44; 10 rounds x 5 steps
of 1/255 from scratch 0.41 (max scaling) and 0.44 (median/l2). The frozen surrogate's batch
estimate E does rise under the ascent (0.56 to 0.82 over 20 steps; 0.9 is the maximum for 10
classes), but the effect does not transfer to the victim at this scale. On 5,000 CIFAR-10
images (5 clean epochs, 20 frozen steps of 1/255, sigma 0.3; 20-epoch victim, 1,000 test
images): 0.57 against clean 0.625, a small effect.

The mixed-data property at CPU scale (2026-11-24; 1,000 CIFAR-10 training images, 100 per
class, 1,000 test images; cnn-small, 30-epoch victim, seed 0): clean 0.505, the clean half
alone 0.392. Victims on all-protected data / on the clean half plus the protected half:
a surrogate pre-trained 30 clean epochs, then 20 frozen steps of 1/255 on the whole-set
estimate, 0.444 / 0.461; the same at eps 16/255 (steps of 2/255) 0.380 / 0.471; the
authors' schedule (8 rounds of a fresh surrogate trained 30 epochs, then one whole-set
step of 1/255; ``benchmarks/results/reproduce-small-cpu-2026-11-24-bayes-authors-mixed.md``)
0.439 / 0.470. For comparison TAP against the same 30-epoch surrogate (20 steps): 0.408 /
0.472, and at eps 16/255 0.216 / 0.418. No method, and no budget up to
16/255, makes the mixed victim worse than the clean half at this scale: 500 extra images,
perturbed or not, are worth more to a victim trained on 500 than the perturbation costs.
The paper's claim (CIFAR-10, ResNet-18, 25,000 + 25,000) needs a GPU to check; the command
is in ``benchmarks/reproduce.py`` (``--mixed 0.5`` with the authors' schedule by ``--set``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..generation import Stage
from ..generation.context import widened
from ..generation.passes import AdamW
from ..ops.bayes import bayes_error, median_bandwidth
from .base import SurrogateMethod
from .settings import SurrogateConfig, bool_setting, choice_setting, int_setting, real_setting

FEATURE_SCALES = ("max", "l2", "none")
ASCENTS = ("adamw", "sign")


@dataclass
class BayesConfig(SurrogateConfig):
    """Settings of a Bayes-error run; defaults are the authors' CIFAR-10 script's (see the module docstring)."""

    epochs: int = 2000  # rounds: one fresh surrogate and one ascent step each
    pgd_steps: int = 1  # ascent steps per round
    alpha: float = 0.5 / 255  # sign-step size (ascent="sign")
    weight_decay: float = 5e-4
    sigma: float | None = 0.3  # kernel bandwidth on the scaled features; None: median heuristic per estimate
    feature_scale: str = "max"  # "max": f / max|f| over the estimate's features (authors'); "l2": unit rows; "none"
    pretrain_epochs: int = 0  # clean surrogate epochs before round 1
    train_surrogate: bool = True  # train the surrogate every round; False: keep it frozen
    retrain_epochs: int = 30  # > 0: every round, a fresh surrogate trained this many epochs; 0: one surrogate
    whole_set: bool = True  # one estimate over all N samples per step instead of one per batch
    ascent: str = "adamw"  # "adamw" on x + delta (authors'), or "sign" steps of alpha
    adam_lr: float = 1e-3
    adam_weight_decay: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.sigma is not None:  # None: the median heuristic
            real_setting("sigma", self.sigma)
        choice_setting("feature_scale", self.feature_scale, FEATURE_SCALES)
        int_setting("pretrain_epochs", self.pretrain_epochs, 0)
        for name in ("train_surrogate", "whole_set"):
            bool_setting(name, getattr(self, name))
        int_setting("retrain_epochs", self.retrain_epochs, 0)
        if self.retrain_epochs and not self.train_surrogate:
            raise ValueError("retrain_epochs trains a fresh surrogate every round; it cannot be combined "
                             "with train_surrogate=False")
        choice_setting("ascent", self.ascent, ASCENTS)
        real_setting("adam_lr", self.adam_lr)
        real_setting("adam_weight_decay", self.adam_weight_decay, closed=True)
        if self.ascent == "adamw" and not self.whole_set:
            raise ValueError("ascent='adamw' steps on the whole set's estimate: it needs whole_set=True")


class Bayes(SurrogateMethod):
    """Maximise the kernel Bayes-error estimate of the surrogate's features."""

    name = "bayes"
    config_class = BayesConfig
    streams = False
    streams_why = "its loss and AdamW state span the whole set at once"
    distributed = True
    presets = {"paper": {}, "cpu-small": dict(arch="cnn-small", epochs=16, retrain_epochs=8, adam_lr=2e-3,
                                              batch_size=64)}

    def setup(self, ctx, images, labels, num_classes):
        super().setup(ctx, images, labels, num_classes)
        cfg = self.config
        # Their gradient is of the sum over samples (N times that of the mean E): Adam's eps sees the scale.
        self.adam = AdamW(self.store, lr=cfg.adam_lr, weight_decay=cfg.adam_weight_decay,
                          grad_scale=len(images)) if cfg.ascent == "adamw" else None

    def blocks(self) -> dict:
        return {**super().blocks(), **({"adam": self.adam} if self.adam is not None else {})}

    def stages(self):
        cfg = self.config
        return [Stage("clean surrogate", cfg.pretrain_epochs, self.pretrain_epoch, key="pretrain_epoch"),
                Stage("rounds", cfg.epochs, self.round)]

    def pretrain_epoch(self, e: int) -> dict:
        cfg = self.config
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (e - 1) / cfg.pretrain_epochs))
        train = self.surrogate.fit(self.data.shuffled(cfg.batch_size, merge_single=True), self.clean_inputs(),
                                   lr=lr, desc=f"clean epoch {e}")
        return dict(lr=lr, **train)

    def round(self, r: int) -> dict:
        cfg, data = self.config, self.data
        train = dict(train_loss=None, train_acc=None, train_s=0.0)
        if cfg.retrain_epochs:  # a fresh surrogate, K epochs, lr cosine from lr to 0
            self.surrogate.reinit(cfg.seed + 1_000_003 * r)
            t = 0.0
            for k in range(cfg.retrain_epochs):
                lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * k / cfg.retrain_epochs))
                train = self.surrogate.fit(data.shuffled(cfg.batch_size, merge_single=True), self.perturbed_inputs(),
                                           lr=lr, desc=f"round {r}: fresh surrogate {k + 1}/{cfg.retrain_epochs}")
                t += train["train_s"]
            train["train_s"] = t
        elif cfg.train_surrogate:
            train = self.surrogate.fit(data.shuffled(cfg.batch_size, merge_single=True), self.perturbed_inputs(),
                                       lr=cfg.learning_rate(r), desc=f"round {r}: surrogate")
        if cfg.whole_set:
            poison = self.pgd.whole_set(self.loss, steps=cfg.pgd_steps, step_size=cfg.alpha, maximize=True,
                                        batch_size=cfg.poison_batch_size, adam=self.adam,
                                        desc=f"round {r}: {cfg.ascent} x{cfg.pgd_steps} (whole set)")
        else:
            poison = self.pgd.per_batch(data.shuffled(cfg.poison_batch_size), self.loss, steps=cfg.pgd_steps,
                                        step_size=cfg.alpha, maximize=True, desc=f"round {r}: PGD x{cfg.pgd_steps}")
        return dict(lr=cfg.learning_rate(r), step_size=cfg.alpha, **train, **poison)

    def scaled(self, features: torch.Tensor) -> torch.Tensor:
        f = widened(features)  # bf16 under autocast
        if self.config.feature_scale == "max":
            return f / f.abs().max().clamp_min(1e-12)
        if self.config.feature_scale == "l2":
            return f / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(1e-12)
        return f

    def loss(self, features, logits, labels):
        """E of the scaled features [B, F]; a batch of one sample has no estimate (0)."""
        if len(labels) < 2:
            return features.sum() * 0  # a last batch can hold one sample
        f = self.scaled(features)
        sigma = self.config.sigma if self.config.sigma is not None else median_bandwidth(f)
        # The labels were validated when the data was read; the range check would sync per step.
        return bayes_error(f, labels, self.num_classes, float(sigma), validate=False)
