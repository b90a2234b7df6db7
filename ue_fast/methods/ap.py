"""AP / TAP (Fowl et al., NeurIPS 2021): adversarial examples of a clean, frozen model as poisons.

"Adversarial Examples Make Strong Poisons" (arXiv:2106.10807). Algorithm (authors' code:
github.com/lhfowl/adversarial_poisons, ``village/options.py``, ``optimization_strategy.py``,
``training.py``, ``furnace.py``, ``forgemaster_base.py``, ``forgemaster_targeted.py``,
``forgemaster_untargeted.py``, ``diff_data_augmentation.py``):

1. train the surrogate on the clean data for ``pretrain_epochs`` epochs (SGD with Nesterov
   momentum, lr x0.1 after epochs P // 2.667, P // 1.6, P // 1.142), every batch under the
   differentiable augmentation T (below), as their ``run_step`` does;
2. freeze it (eval mode); for each of ``restarts`` restarts: start from
   ``clip(eps * N(0, 1), -eps, eps)`` and take ``pgd_steps`` sign steps of ``alpha`` per
   sample on
   - ``ap`` (untargeted): ascend ``CE(f(T(x + delta)), y)``;
   - ``tap`` (class-targeted, their default recipe): descend ``CE(f(T(x + delta)), (y + 1) mod C)``,
   projecting to ``[-eps, eps]`` and ``x + delta`` to [0, 1] after each step; T is a fresh
   random bilinear translation by up to ``max_shift`` pixels and a horizontal flip at every
   step (``--paugment``, their default);
3. keep the restart whose objective at the last step, averaged over the set, is best.

Every sample's loss depends on it alone (batch norm in eval mode), so ``pgd_steps`` steps
per batch equal the authors' ``pgd_steps`` passes of one step over the set.

Still differs from the authors' code, and why: the translation pads with the CIFAR-10
mean colour (theirs pads with zeros after normalisation, i.e. with their normalisation's
mean colour; the same for CIFAR-10); the objective compared across restarts is the mean
over samples (theirs: the mean over batches, which weighs a short last batch more).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generation import Stage
from ..generation.context import widened
from ..generation.passes import INITS
from ..generation.transforms import shift_flip
from .base import SurrogateMethod
from .settings import SurrogateConfig, bool_setting, choice_setting, int_setting, real_setting

PRETRAIN_SCHEDULES = ("step", "cosine", "constant")


@dataclass
class APConfig(SurrogateConfig):
    """Settings of an AP / TAP run; defaults are the authors' CIFAR-10 settings: eps 8/255;
    250 PGD steps of ``alpha = 0.05 eps`` (``--tau 0.05``); 8 restarts (their README suggests 1
    for speed); poison batch 512; ResNet-18 pre-trained 40 clean epochs (SGD lr 0.1, Nesterov
    momentum 0.9, weight decay 5e-4, batch 128) with their shift-and-flip augmentation."""

    epochs: int = 1  # PGD passes per restart (each of pgd_steps steps per batch)
    pgd_steps: int = 250
    alpha: float | None = None  # PGD step size; None: 0.05 * eps
    weight_decay: float = 5e-4
    nesterov: bool = True
    pretrain_epochs: int = 40  # clean surrogate epochs before the attack
    pretrain_schedule: str = "step"  # "step": lr x0.1 at 3/8, 5/8, 7/8 of pretraining; "cosine"; "constant"
    pretrain_augment: bool = True  # train the clean surrogate under the shift-and-flip augmentation
    augment: bool = True  # differentiable random shift + flip at every PGD step
    max_shift: float = 4.0  # pixels, each direction
    restarts: int = 8
    init: str = "gaussian"  # a restart's start: "gaussian" (theirs), "uniform" or "zero"

    def default_alpha(self) -> float:
        return 0.05 * self.eps  # their --tau 0.05

    def validate(self) -> None:
        super().validate()
        int_setting("pretrain_epochs", self.pretrain_epochs, 0)
        choice_setting("pretrain_schedule", self.pretrain_schedule, PRETRAIN_SCHEDULES)
        for name in ("pretrain_augment", "augment"):
            bool_setting(name, getattr(self, name))
        real_setting("max_shift", self.max_shift, 0.0, closed=True)  # pixels
        int_setting("restarts", self.restarts)
        choice_setting("init", self.init, tuple(i for i in INITS if i != "keep"))

    def pretrain_lr(self, epoch: int) -> float:
        """lr of clean epoch ``epoch`` (1-based): the authors' step decay, cosine, or constant."""
        p = self.pretrain_epochs
        if self.pretrain_schedule == "constant":
            return self.lr
        if self.pretrain_schedule == "cosine":
            import math

            return self.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(p, 1)))
        # torch MultiStepLR with milestones P // 2.667, P // 1.6, P // 1.142, stepped per epoch
        drops = sum(epoch - 1 >= m for m in (p // 2.667, p // 1.6, p // 1.142))
        return self.lr * 0.1 ** drops


class AP(SurrogateMethod):
    """Untargeted adversarial poisoning: maximise the frozen clean surrogate's cross-entropy."""

    name = "ap"
    distributed = True
    config_class = APConfig
    maximize = True
    # cpu-small: 10 clean epochs, one restart of 20 steps of 1/255. Measured (benchmarks/reproduce.py --scale
    # small, clean 41.7%): with the paper's 0.05 eps = 0.4/255, 20 steps cannot wash out the Gaussian start
    # (AP 39.4%, TAP 39.5%); with 1/255, AP 34.5%.
    presets = {"paper": {}, "cpu-small": dict(arch="cnn-small", pretrain_epochs=10, pgd_steps=20, alpha=1 / 255,
                                              batch_size=64, restarts=1)}

    def setup(self, ctx, images, labels, num_classes):
        super().setup(ctx, images, labels, num_classes)
        self.best_score: float | None = None  # the best restart's objective so far
        self.best = self.store.twin("best") if self.config.restarts > 1 else None  # its perturbations

    def stages(self):
        cfg = self.config
        return [Stage("clean surrogate", cfg.pretrain_epochs, self.pretrain_epoch, key="pretrain_epoch"),
                Stage("attack passes", cfg.restarts * cfg.epochs, self.attack_pass)]

    def pretrain_epoch(self, e: int) -> dict:
        cfg = self.config
        aug = self.augmented if cfg.pretrain_augment else None
        train = self.surrogate.fit(self.data.shuffled(cfg.batch_size, merge_single=True), self.clean_inputs(aug),
                                   lr=cfg.pretrain_lr(e), desc=f"clean epoch {e}")
        return dict(lr=cfg.pretrain_lr(e), **train)

    def attack_pass(self, i: int) -> dict:
        cfg = self.config
        first, last = (i - 1) % cfg.epochs == 0, i % cfg.epochs == 0
        poison = self.pgd.per_batch(self.data.shuffled(cfg.poison_batch_size), self.loss, steps=cfg.pgd_steps,
                                    step_size=cfg.alpha, maximize=self.maximize, init=cfg.init if first else "keep",
                                    inputs=self.inputs, desc=f"pass {i}: PGD x{cfg.pgd_steps}")
        if last and cfg.restarts > 1:
            self.keep_best(-poison["poison_loss"] if self.maximize else poison["poison_loss"])
        return dict(train_s=0.0, restart=(i - 1) // cfg.epochs + 1, **poison)

    def keep_best(self, score: float) -> None:
        """After a restart: keep its perturbations if its objective (lower is better) is the best
        so far, else put the best back in the store."""
        if self.best_score is None or score < self.best_score:
            self.best_score = score
            self.best.copy_from(self.store)
        else:
            self.store.copy_from(self.best)

    def extra_state(self) -> dict:
        return {"score": self.best_score, **({"best": self.best.state_dict()} if self.best is not None else {})}

    def load_extra_state(self, state: dict) -> None:
        self.best_score = state["score"]
        if self.best is not None:
            self.best.load_state_dict(state["best"])

    def augmented(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = self.data.draws().rand(len(x), 3)  # the run's generator: checkpointed, seeded
        return shift_flip(x, u, self.config.max_shift)

    def inputs(self, x, delta, y):
        return self.augmented(x + delta, y) if self.config.augment else x + delta

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def loss(self, features, logits, labels):
        """Mean cross-entropy of the surrogate's logits [B, C] against ``target(labels)``."""
        return F.cross_entropy(widened(logits), self.target(labels))


class TAP(AP):
    """Class-targeted adversarial poisoning: minimise cross-entropy towards (y + 1) mod C."""

    name = "tap"
    maximize = False

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels + 1) % self.num_classes
