"""SEP (Chen et al., ICLR 2023): self-ensemble protection, PGD against one run's checkpoints.

"Self-Ensemble Protection: Training Checkpoints Are Good Data Protectors"
(arXiv:2211.12005). One surrogate is trained once on the clean data;
its checkpoints along the way form the ensemble the perturbation is crafted against, a
targeted attack that moves each image's features towards another class. Algorithm
(authors' code: github.com/Sizhe-Chen/SEP @ 02519d8, ``vanilla.py`` (training),
``ens.py`` (SEP), ``ens_feature.py`` (SEP-FA), ``ens_feature_svre.py`` (SEP-FA-VR, the
method of their README and of the paper's Algorithm 1)):

1. train the surrogate on the clean data for ``pretrain_epochs`` = 120 epochs (SGD lr 0.1,
   momentum 0.9, weight decay 5e-4, batch 128, lr x0.1 at epochs 75 and 90, the first epoch
   a per-batch linear warm-up from 0.001; 4-pixel zero-padded random crop and flip), keeping
   the weights after every ``pretrain_epochs / members``-th epoch, the last included:
   ``members`` = 15 (epochs 8, 16, ..., 120);
2. the target class of label y is ``(y + C / 2) mod C`` (theirs: (y + 5) mod 10);
3. ``variant``:
   - ``"ce"`` (SEP): each step descends the mean over members of ``CE(f_k(x + delta), target)``;
   - ``"fa"`` (SEP-FA): the mean over members of ``MSE(phi_k(x + delta), mu_k[target])``, phi_k
     member k's penultimate features and ``mu_k[c]`` their mean over class c's clean images;
   - ``"fa-vr"`` (SEP-FA-VR, the default): the FA loss with stochastic variance reduction
     (SVRE): at each step the members' gradients ``g_k`` at the current x and their mean g;
     then ``vr_steps`` = 16 inner steps from it, each on a member k drawn at random,
     accumulating ``S += grad_k(x_inner) - (g_k - g)`` and stepping ``x_inner`` on sign(S);
     the outer step is then taken on sign(S);
4. every step: ``delta <- clip(delta - alpha sign(G), -eps, eps)``, ``x + delta`` in [0, 1]; from
   zero (the clean image), ``pgd_steps`` = 30 steps of ``alpha`` = 1/255 at eps = 2/255 (SEP's
   budget: "small l_inf = 2/255"), members in eval mode, no augmentation.

The members' forward and input gradients run as one batched pass over the stacked weights
(``ue_fast.generation.ensemble``: ``torch.func`` ``vmap`` over ``functional_call``) on a
GPU, a loop on a CPU, where it is faster (``ensemble="auto"``; both give the same result to
float rounding; ``benchmarks/bench_ensemble.py`` measures them).

Still differs from the authors' code, and why:

- the members are the snapshots of this run (theirs: read back from files of a seed-2 run
  whose training script, for CIFAR-10, saves only epochs whose test accuracy improved;
  their selection code expects one file per epoch, as their CIFAR-100 script writes);
- SEP-FA-VR's inner steps align member k to member k's class centroids (theirs uses the last
  member's centroids there, a stale loop index, ``ens_feature_svre.py`` line 209);
- the inner draws come from the run's seeded generator (theirs: NumPy's global one);
- the class centroids are computed once for the whole set (theirs: per 5,000-image chunk
  run, the same numbers recomputed ten times).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generation import Stage
from ..generation.batches import streamed
from ..generation.context import widened
from ..generation.ensemble import Ensemble
from ..generation.transforms import random_crop_flip
from ..ops import pgd_step_
from .base import SurrogateMethod
from .settings import SurrogateConfig, choice_setting, int_setting

VARIANTS = ("ce", "fa", "fa-vr")
ENSEMBLE_FORWARDS = ("auto", "batched", "loop")


@dataclass
class SEPConfig(SurrogateConfig):
    """Settings of a SEP run; defaults are the authors' CIFAR-10 settings (see the module docstring)."""

    eps: float = 2 / 255
    pgd_steps: int = 30
    alpha: float = 1 / 255
    batch_size: int = 128
    poison_batch_size: int = 512
    weight_decay: float = 5e-4
    pretrain_epochs: int = 120
    members: int = 15  # checkpoints in the ensemble, evenly spaced, ending at the last epoch
    variant: str = "fa-vr"
    vr_steps: int = 16  # SEP-FA-VR's inner steps (their --msvrg)
    crop_padding: int | None = None  # None: image size // 8 (4 at 32x32)
    ensemble: str = "auto"  # "batched" (vmap), "loop", or "auto": batched on CUDA; not the algorithm

    def validate(self) -> None:
        super().validate()
        int_setting("pretrain_epochs", self.pretrain_epochs)
        int_setting("members", self.members)
        if self.members > self.pretrain_epochs:
            raise ValueError(f"members ({self.members}) cannot exceed pretrain_epochs ({self.pretrain_epochs}): "
                             "one checkpoint per epoch at most")
        choice_setting("variant", self.variant, VARIANTS)
        int_setting("vr_steps", self.vr_steps)
        if self.crop_padding is not None:
            int_setting("crop_padding", self.crop_padding, 0)
        choice_setting("ensemble", self.ensemble, ENSEMBLE_FORWARDS)

    def kept_epochs(self) -> list[int]:
        """The epochs (1-based) after which the weights join the ensemble: every
        ``pretrain_epochs // members``-th, counted back from the last."""
        every = self.pretrain_epochs // self.members
        return [self.pretrain_epochs - every * i for i in range(self.members)][::-1]

    def pretrain_lr(self, epoch: int) -> float:
        """lr of epoch ``epoch`` (1-based) after the warm-up: x0.1 at 5/8 and 3/4 of training
        (their milestones 75 and 90 of 120)."""
        p = self.pretrain_epochs
        return self.lr * 0.1 ** sum(epoch - 1 >= m for m in (round(p * 0.625), round(p * 0.75)))


class SEP(SurrogateMethod):
    """Self-ensemble protection; see the module docstring."""

    name = "sep"
    config_class = SEPConfig
    # cpu-small: a cnn-small surrogate, 10 epochs, 5 members, eps 8/255 (the budget of the other
    # methods here; SEP's 2/255 does not show at this scale), 10 steps of 1/255, 4 inner steps.
    presets = {"paper": {}, "cpu-small": dict(arch="cnn-small", pretrain_epochs=10, members=5, eps=8 / 255,
                                              pgd_steps=10, vr_steps=4, batch_size=64)}

    def setup(self, ctx, images, labels, num_classes):
        super().setup(ctx, images, labels, num_classes)
        self.padding = max(images.shape[2:]) // 8 if self.config.crop_padding is None else self.config.crop_padding
        self.snapshots: list[dict] = []

    def stages(self):
        cfg = self.config
        return [Stage("surrogate training", cfg.pretrain_epochs, self.train_epoch, key="pretrain_epoch"),
                Stage("attack", 1, self.attack)]

    # -- 1. one training run, its checkpoints kept ------------------------------------------
    def train_epoch(self, e: int) -> dict:
        cfg = self.config
        batches = self.data.shuffled(cfg.batch_size, merge_single=True)
        inputs = self.clean_inputs(lambda x, y: random_crop_flip(x, self.padding, self.data.draws()))
        if e == 1:  # warm-up: per batch, linearly from 0.001 to lr
            n = len(batches)
            parts = [self.surrogate.fit(batches[b:b + 1], inputs, lr=0.001 + (cfg.lr - 0.001) * b / max(n - 1, 1),
                                        desc=None) for b in range(n)]
            seen = sum(len(b) for b in batches)
            train = dict(train_loss=sum(p["train_loss"] * len(b) for p, b in zip(parts, batches)) / seen,
                         train_acc=sum(p["train_acc"] * len(b) for p, b in zip(parts, batches)) / seen,
                         train_s=sum(p["train_s"] for p in parts))
            lr = cfg.lr
        else:
            lr = cfg.pretrain_lr(e)
            train = self.surrogate.fit(batches, inputs, lr=lr, desc=f"epoch {e}")
        kept = e in cfg.kept_epochs()
        if kept:
            self.snapshots.append({k: v.detach().clone() for k, v in self.surrogate.model.state_dict().items()})
        return dict(lr=lr, **train, kept=kept)

    def extra_state(self) -> dict:
        return {"snapshots": self.snapshots}

    def load_extra_state(self, state: dict) -> None:
        self.snapshots = [{k: v.to(self.ctx.device) for k, v in s.items()} for s in state["snapshots"]]

    # -- 2.-4. the attack ---------------------------------------------------------------------
    def ensemble(self) -> Ensemble:
        cfg = self.config
        batched = cfg.ensemble == "batched" or (cfg.ensemble == "auto" and self.ctx.device.type == "cuda")
        return Ensemble(self.surrogate.model, self.snapshots, batched=batched, autocast=self.ctx.autocast)

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels + self.num_classes // 2) % self.num_classes

    @torch.no_grad()
    def centroids(self, ens: Ensemble) -> torch.Tensor:
        """Per member, the mean penultimate features of each class's clean images: [M, C, F]."""
        sums = counts = None
        for idx in streamed(self.data.ordered(self.config.poison_batch_size)):
            feats, _ = ens.forward(self.data.clean(idx))  # [M, B, F]
            y = self.data.labels[idx].to(self.ctx.device)
            if sums is None:
                sums = torch.zeros(ens.size, self.num_classes, feats.shape[-1], device=self.ctx.device)
                counts = torch.zeros(self.num_classes, device=self.ctx.device)
            sums.index_add_(1, y, feats.float())
            counts += torch.bincount(y, minlength=self.num_classes)
        return sums / counts.clamp_min(1)[None, :, None]

    @staticmethod
    def ce_loss(features, logits, target, aux):
        return F.cross_entropy(widened(logits), target)

    @staticmethod
    def fa_loss(features, logits, target, centroids):
        return F.mse_loss(widened(features), centroids[target])

    def attack(self, i: int) -> dict:
        cfg, data = self.config, self.data
        t0 = time.perf_counter()
        ens = self.ensemble()
        aux, loss = (None, self.ce_loss) if cfg.variant == "ce" else (self.centroids(ens), self.fa_loss)
        draws = data.draws()
        self.store.begin_pass()
        total, seen = 0.0, 0
        batches = data.shuffled(cfg.poison_batch_size)
        bar = self.ctx.bar(sum(len(b) for b in batches), f"attack: PGD x{cfg.pgd_steps} on {ens.size} members")
        for idx in streamed(batches):
            x, target = data.clean(idx), self.target(data.labels[idx]).to(self.ctx.device)
            delta = self.store.samples(idx).to(x.dtype, copy=True)  # zero at first: the clean image
            for _ in range(cfg.pgd_steps):
                with self.ctx.timer("ensemble gradients"):
                    g_all, values = ens.grads(x + delta, target, loss, aux)
                    g = g_all.mean(0)
                if cfg.variant == "fa-vr":
                    with self.ctx.timer("variance reduction"):
                        s, inner = torch.zeros_like(g), delta.clone()
                        for k in draws.randint(ens.size, cfg.vr_steps).tolist():
                            s += ens.member_grad(k, x + inner, target, loss, aux) - (g_all[k] - g)
                            pgd_step_(inner, s, x, eps=cfg.eps, step_size=cfg.alpha)
                        g = s
                with self.ctx.timer("step"):
                    pgd_step_(delta, g, x, eps=cfg.eps, step_size=cfg.alpha)
            self.store.put(idx, delta)
            total += float(values.mean()) * len(idx)
            seen += len(idx)
            bar.update(len(idx))
        bar.close()
        return dict(train_s=0.0, poison_loss=total / max(seen, 1), poison_s=time.perf_counter() - t0,
                    members=ens.size)
