"""EM (Huang et al., ICLR 2021): error-minimising noise, sample-wise and class-wise.

Min-min bi-level optimisation: the perturbation makes the training loss of the
surrogate f small, so a network trained on ``x + delta`` has nothing to learn::

    min_theta  E_(x,y) [ min_{|delta|_inf <= eps}  CE(f_theta(x + delta), y) ]

Algorithm (authors' code: github.com/HanxunH/Unlearnable-Examples, ``perturbation.py``
``sample_wise_perturbation`` / ``universal_perturbation``, ``toolbox.py``, ``trainer.py``),
round r = 1, 2, ...:

1. train f for ``train_steps`` batches with cross-entropy on ``x + delta`` (no
   augmentation, constant learning rate: their scheduler is never stepped in the search;
   the gradient norm clipped at ``grad_clip``, their trainer's ``grad_clip: 5.0``);
2. f frozen in eval mode, over the whole set: K steps of
   ``delta <- clip(delta - alpha * sign(grad_delta CE(f(x + delta), y)), -eps, eps)``,
   ``delta <- clip(x + delta, 0, 1) - x``;
3. stop once f classifies ``clip(x + delta, 0, 1)`` with accuracy >= ``stop_acc``
   (their ``universal_stop_error``), or after ``epochs`` rounds.

Class-wise EM keeps one ``delta_c`` per class, shared by all its images.

Still differs from the authors' code, and why:

- batches are drawn from a fresh shuffle every round (theirs: a fixed order, CIFAR-10's
  own, which is already random; an image folder is sorted by class, so a fixed order here
  would train on one class at a time);
- class-wise: every image takes part and the class's gradients are summed before one sign
  step per batch (theirs: a 20% subset, ``--use_subset``, and the class noise replaced by the
  mean of the batch's per-sample one-step updates);
- the accuracy for the stop is over all images at once (theirs: the mean of per-batch
  accuracies, which weighs a short last batch more).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..generation import Stage
from ..generation.context import widened
from .base import SurrogateMethod
from .settings import SurrogateConfig, int_setting, real_setting


@dataclass
class EMConfig(SurrogateConfig):
    """Settings of a sample-wise EM run; defaults are the authors' CIFAR-10 settings.

    From ``configs/cifar10/resnet18.yaml`` and ``scripts/cifar10/min-min-noise/samplewise-noise``:
    ResNet-18 surrogate, SGD lr 0.1, momentum 0.9, weight decay 5e-4, gradient norm clipped
    at 5; batches of 512 for the surrogate and the perturbation; 10 surrogate batches per
    round; 20 PGD steps of 0.8/255 at eps 8/255 from zero noise; stop at 99% accuracy
    (``universal_stop_error 0.01``). Their search has no round limit; ``epochs`` (default
    100 rounds, i.e. 1,000 surrogate batches) bounds ours.
    """

    epochs: int = 100  # at most this many rounds; the run usually stops earlier at stop_acc
    pgd_steps: int = 20
    alpha: float = 0.8 / 255
    batch_size: int = 512
    poison_batch_size: int = 512
    weight_decay: float = 5e-4
    train_steps: int = 10  # surrogate batches per round (at most one epoch)
    stop_acc: float = 0.99  # stop once the surrogate fits x + delta this well
    grad_clip: float | None = 5.0  # surrogate gradient-norm clip (their trainer's); None: none

    def validate(self) -> None:
        super().validate()
        int_setting("train_steps", self.train_steps)
        real_setting("stop_acc", self.stop_acc, 0.0, 1.0, closed=True)
        if self.grad_clip is not None:
            real_setting("grad_clip", self.grad_clip)

    def learning_rate(self, epoch: int) -> float:
        """Constant: EM never steps its scheduler while it searches for the noise."""
        return self.lr


@dataclass
class EMClasswiseConfig(EMConfig):
    """As ``EMConfig`` except one PGD step per batch (``num_steps 1`` in
    ``scripts/cifar10/min-min-noise/classwise-noise``); the stop criterion of that script is
    also 99% (their README's example uses 90%)."""

    pgd_steps: int = 1


class EM(SurrogateMethod):
    """Sample-wise error-minimising noise: PGD descends the surrogate's cross-entropy."""

    name = "em"
    distributed = True
    config_class = EMConfig
    presets = {"paper": {}, "cpu-small": dict(arch="cnn-small", batch_size=64, poison_batch_size=256, epochs=20)}

    def stages(self):
        return [Stage("rounds", self.config.epochs, self.round)]

    def round(self, r: int) -> dict:
        cfg, data = self.config, self.data
        batches = data.shuffled(cfg.batch_size, merge_single=True)[:cfg.train_steps]
        train = self.surrogate.fit(batches, self.perturbed_inputs(), lr=cfg.learning_rate(r),
                                   clip_grad_norm=cfg.grad_clip, desc=f"round {r}: surrogate")
        batches = data.shuffled(cfg.poison_batch_size)
        kind = self.pgd.classwise if self.classwise else self.pgd.per_batch
        poison = kind(batches, self.loss, steps=cfg.pgd_steps, step_size=cfg.step_size(r),
                      desc=f"round {r}: PGD x{cfg.pgd_steps}")
        with self.ctx.timer("stopping criterion"):
            acc = self.poisoned_accuracy()
        return dict(lr=cfg.learning_rate(r), step_size=cfg.step_size(r), **train, **poison, poisoned_acc=acc,
                    finished=acc >= cfg.stop_acc)

    @staticmethod
    def loss(features, logits, labels):
        """``CE(logits, labels)``, averaged over the batch (the sign step ignores the scale)."""
        return F.cross_entropy(widened(logits), labels)


class EMClasswise(EM):
    """Class-wise error-minimising noise: one perturbation per class."""

    name = "em-classwise"
    config_class = EMClasswiseConfig
    classwise = True
