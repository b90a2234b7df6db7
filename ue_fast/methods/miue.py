"""MI-UE (ICLR 2026): perturbations that make same-class features point the same way.

Algorithm (authors' code: github.com/hala64/mi-ue, ``gen_miue.py`` and ``utils.py``),
for outer epoch e = 1..E:

1. the surrogate trains one epoch with cross-entropy on ``x + delta`` (SGD; lr cosine per
   outer epoch from ``lr`` towards ``lr_min``);
2. frozen, in eval mode, over the whole set in shuffled batches: K steps of
   ``delta <- clip(delta - alpha_e * sign(grad_delta L), -eps, eps)``,
   ``delta <- clip(x + delta, 0, 1) - x``, with ``L`` the supervised-contrastive loss
   (``ue_fast.supcon_loss``, temperature 0.1) of the surrogate's penultimate features, or the
   centroid form (``ue_fast.centroid_loss``) with ``loss="centroid"``.

``alpha_e = ((E - e + 1)/E) (alpha_0 - alpha_end) + alpha_end`` with ``alpha_0 = 0.2/255``
and ``alpha_end = 4/(255 K)``. With post-augmentation (the authors' ``--post-aug``) the
clean image is flipped at random before ``delta`` is added, in both stages, so the noise
survives flips; their full-area RandomResizedCrop is the identity at 32x32.

Still differs from the authors' code, and why:

- no ``+1e-8`` on each exponential of the loss (it only biases a sum of terms >= e^-10);
- the surrogate normalises inputs by CIFAR-10 statistics and initialises its first
  convolution like the others (theirs: ImageNet statistics, PyTorch's default init after
  replacing ``conv1``): this project's model zoo is shared by every method;
- the output is rounded to 8 bits by ``ue_fast.protect`` (stochastically by default; their
  evaluation loader truncates).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation import Stage
from ..generation.context import widened
from ..ops import centroid_loss, supcon_loss
from .base import SurrogateMethod
from .settings import SurrogateConfig, choice_setting, real_setting

LOSSES = ("supcon", "centroid")


@dataclass
class MIUEConfig(SurrogateConfig):
    """Settings of an MI-UE run; defaults are the authors' CIFAR-10 settings."""

    alpha: float = 0.2 / 255  # alpha_0, first epoch's step
    post_aug: bool = True
    alpha_end: float | None = None  # last epoch's step; None: 4 / (255 K)
    temperature: float = 0.1
    loss: str = "supcon"

    def validate(self) -> None:
        super().validate()
        real_setting("temperature", self.temperature)
        if self.alpha_end is not None:
            real_setting("alpha_end", self.alpha_end)
        choice_setting("loss", self.loss, LOSSES)

    def step_size(self, epoch: int) -> float:
        """alpha_e for outer epoch ``epoch`` in 1..E."""
        end = self.alpha_end if self.alpha_end is not None else 4 / (255 * self.pgd_steps)
        return (self.epochs - epoch + 1) / self.epochs * (self.alpha - end) + end


class MIUE(SurrogateMethod):
    """MI-UE: minimise the supervised-contrastive loss of the surrogate's features."""

    name = "miue"
    config_class = MIUEConfig
    distributed = True
    # cpu-small: 20 outer epochs x 5 steps of a constant 1/255 on the small CNN (the paper's 100 x 10
    # steps of 0.2-0.4/255 would take hours on a CPU). benchmarks/reproduce.py --scale small (clean 41.7%):
    # 17.7% protected; 10 epochs x 10 steps from 0.8/255 to 0.4/255 protected less, 29.7%.
    presets = {"paper": {}, "cpu-small": dict(arch="cnn-small", epochs=20, pgd_steps=5, alpha=1 / 255,
                                              alpha_end=1 / 255, batch_size=32)}

    def stages(self):
        return [Stage("outer epochs", self.config.epochs, self.outer_epoch)]

    def outer_epoch(self, e: int) -> dict:
        cfg, data = self.config, self.data
        train = self.surrogate.fit(data.shuffled(cfg.batch_size, merge_single=True),
                                   self.perturbed_inputs(flip=cfg.post_aug), lr=cfg.learning_rate(e),
                                   desc=f"epoch {e}: surrogate")
        poison = self.pgd.per_batch(data.shuffled(cfg.poison_batch_size), self.loss, steps=cfg.pgd_steps,
                                    step_size=cfg.step_size(e), flip=cfg.post_aug, desc=f"epoch {e}: PGD x{cfg.pgd_steps}")
        return dict(lr=cfg.learning_rate(e), step_size=cfg.step_size(e), **train, **poison)

    def loss(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss the perturbation minimises, of surrogate features [B, F]."""
        features = widened(features)  # bf16 under autocast: the loss accumulates in float32 anyway
        if self.config.loss == "centroid":
            return centroid_loss(features, labels, self.num_classes)
        return supcon_loss(features, labels, self.config.temperature)
