"""PIL (ICLR 2026): perturbations from a linear surrogate, protection in about a GPU minute.

"Perturbation-Induced Linearization" (arXiv:2601.19967). A bias-free linear model is trained
once on the clean data; each image's noise then makes the noise alone look like its class
to that model while the protected image looks like no class at all. Algorithm (authors'
code: github.com/jinlinll/pil @ 50a2803, ``main.py``, ``trainer.py`` ``train_model``,
``attacks.py`` ``PILAdversary``, ``models/linearmodel.py``):

1. train the surrogate ``f(x) = W2 W1 vec(x)`` (``ue_fast.models.LinearNet``, arch
   ``linear``: no bias, no normalisation) on the clean images, no augmentation: 30 epochs of
   batches of 512, SGD lr 0.003, momentum 0.9, no weight decay, cosine annealing per epoch
   to 0;
2. freeze it; per batch of 512, from noise ``n`` uniform in ``[-eps, eps]``, 30 sign steps of
   eps/10 descending ``0.9 CE(f(n), y) + 0.1 KL(u || softmax(f(x - n)))`` (u uniform over
   the classes; batch means), ``n`` clipped to ``[-eps, eps]``;
3. the protected image is ``clip(x - n, 0, 1)``: here ``delta = -n``, so the loss reads
   ``0.9 CE(f(-delta), y) + 0.1 KL(u || softmax(f(x + delta)))``.

Their README: "On a single GPU, generating PIL-based perturbations for the entire CIFAR-10
training set (50,000 images) takes only ~1 minute" (step 2), "2 minutes" with step 1; no
GPU named. ``benchmarks/bench_methods.py`` has the CPU figures and the projection.

Still differs from the authors' code, and why:

- the surrogate's batches are shuffled every epoch (theirs: the data set's order, unshuffled;
  CIFAR-10's own order is random, an image folder's is sorted by class, so a fixed order would
  train on one class at a time);
- ``x + delta`` is clipped to [0, 1] after every step, as every method here (theirs clips once,
  at the end), and the uniform start is drawn within [0, 1] around x;
- the output is rounded to 8 bits stochastically (theirs is saved as float and floored when
  loaded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generation.context import widened
from .ap import AP, APConfig
from .settings import real_setting


@dataclass
class PILConfig(APConfig):
    """Settings of a PIL run; defaults are the authors' CIFAR-10 settings (see the module docstring)."""

    arch: str = "linear"
    pgd_steps: int = 30
    alpha: float | None = None  # None: eps / 10
    batch_size: int = 512
    poison_batch_size: int = 512
    lr: float = 0.003
    weight_decay: float = 0.0
    nesterov: bool = False
    pretrain_epochs: int = 30
    pretrain_schedule: str = "cosine"
    pretrain_augment: bool = False
    augment: bool = False
    restarts: int = 1
    init: str = "uniform"
    lmd: float = 0.9  # weight of the noise's cross-entropy; 1 - lmd that of the KL term

    def default_alpha(self) -> float:
        return self.eps / 10

    def validate(self) -> None:
        super().validate()
        real_setting("lmd", self.lmd, 0.0, 1.0, closed=True)


class PIL(AP):
    """Perturbation-induced linearisation: noise from a frozen, clean-trained linear surrogate."""

    name = "pil"
    config_class = PILConfig
    maximize = False
    # cpu-small: the paper's schedule; a linear model on 1,000 images trains in about a second.
    presets = {"paper": {}, "cpu-small": {}}

    def inputs(self, x, delta, y):
        """[x + delta; -delta]: the protected images, then the noise n = -delta alone (2B rows)."""
        return torch.cat([x + delta, -delta])

    def loss(self, features, logits, labels):
        """``lmd CE(f(n), y) + (1 - lmd) KL(u || softmax(f(x + delta)))``, batch means, for the
        2B logits of :meth:`inputs`."""
        b = labels.shape[0]
        logits = widened(logits)
        protected, noise = logits[:b], logits[b:]
        ce = F.cross_entropy(noise, labels)
        c = logits.shape[1]
        kl = (-math.log(c) - F.log_softmax(protected, dim=1).mean(1)).mean()  # sum_k u_k log(u_k / p_k)
        return self.config.lmd * ce + (1 - self.config.lmd) * kl
