"""PGD passes over the perturbation store, with the surrogate frozen.

One step on a perturbation ``delta`` is ``pgd_step_``: ``delta -+ step_size * sign(grad)``
(descending a loss, or ascending with ``maximize``), clipped to ``[-eps, eps]`` and so
that ``x + delta`` stays in [0, 1]; with a mask, only masked pixels move. Three passes:

- :meth:`PGD.per_batch`: every index batch takes ``steps`` steps on its own loss;
- :meth:`PGD.classwise`: one perturbation per class, its gradient summed over the class's
  samples in each batch;
- :meth:`PGD.whole_set`: each step differentiates one loss of all N samples' features,
  computed batch by batch without a graph and back-propagated batch by batch.

The method gives the loss ``loss(features, logits, y)`` and, optionally, ``inputs(x, delta, y)``,
the surrogate's input for clean x and perturbation delta (default ``x + delta``; an input
transform such as differentiable augmentations or an inner adversary goes there).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..ops import pgd_step_
from .batches import Batches
from .context import RunContext
from .store import PerturbationStore
from .surrogate import Surrogate

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (features, logits, y) -> 0-d
InputFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, delta, y) -> input
INITS = ("keep", "zero", "uniform", "gaussian")


def _plus(x, delta, y):
    return x + delta


class PGD:
    """The PGD passes of one run over ``store`` with ``surrogate``, budget ``eps``.

    ``mask``: bool [N, 1, H, W] on the store's place of the pixels allowed to move (None:
    all); ``mask_source``, if set, makes it at the start of the first pass (SALM's saliency
    needs the surrogate trained by then).
    """

    def __init__(self, ctx: RunContext, surrogate: Surrogate, data: Batches, store: PerturbationStore, eps: float):
        self.ctx, self.surrogate, self.data, self.store, self.eps = ctx, surrogate, data, store, eps
        self.mask: torch.Tensor | None = None
        self.mask_source: Callable[[], torch.Tensor] | None = None

    def _mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[idx.to(self.data.place)].to(self.ctx.device)

    def _begin(self) -> None:
        if self.mask is None and self.mask_source is not None:
            with self.ctx.timer("saliency"):
                self.mask = self.mask_source()
        self.store.begin_pass()

    def _init(self, how: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The starting perturbation of a batch: the stored one ("keep"), zero, uniform in the
        eps ball with ``x + delta`` in [0, 1] ("uniform"), or ``eps * N(0, 1)`` clipped to the
        ball ("gaussian"; the first step's projection brings ``x + delta`` into [0, 1]). Noise is
        drawn from the run's generator."""
        if how == "keep":
            return delta
        if how == "zero":
            return torch.zeros_like(delta)
        if how == "gaussian":
            z = torch.randn(delta.shape, generator=self.data.gen).to(delta.device)
            return (z * self.eps).clamp_(-self.eps, self.eps)
        u = torch.rand(delta.shape, generator=self.data.gen).to(delta.device)
        return (x + (2 * u - 1) * self.eps).clamp_(0, 1) - x

    def per_batch(self, batches: list[torch.Tensor], loss: Loss, *, steps: int, step_size: float,
                  maximize: bool = False, flip: bool = False, inputs: InputFn = _plus, init: str = "keep",
                  desc: str = "PGD") -> dict:
        """``steps`` steps per index batch on ``loss`` of the surrogate at ``inputs(x, delta, y)``;
        ``flip``: the clean images are flipped at random first (post-augmentation); ``init``: the
        batch's start (see ``_init``). Returns the mean last-step ``poison_loss`` and ``poison_s``."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        t0, timer, data = time.perf_counter(), self.ctx.timer, self.data
        self._begin()
        loss_sum = torch.zeros((), device=self.ctx.device)
        seen = 0
        bar = self.ctx.bar(sum(len(b) for b in batches), desc)
        with self.surrogate.frozen():
            try:
                for idx in batches:
                    with timer("data"):
                        x, y = data.clean(idx, flip), data.labels[idx]
                        leaf = self._init(init, x, self.store.samples(idx))
                        mask = self._mask(idx)
                    for _ in range(steps):
                        last = self._step(leaf, x, x, y, loss, inputs, step_size, maximize, mask)
                        leaf = last[0]
                    loss_sum += last[1] * len(idx)
                    seen += len(idx)
                    with timer("step"):
                        self.store.put(idx, leaf)
                    bar.update(len(idx))
            finally:
                bar.close()
        return dict(poison_loss=float(loss_sum) / max(seen, 1), poison_s=time.perf_counter() - t0)

    def _step(self, leaf, x_delta, x_clip, y, loss, inputs, step_size, maximize, mask):
        """One PGD step of ``leaf`` (the delta tensor a gradient is taken of); ``x_delta`` is what
        it is added to, ``x_clip`` the images its pixel-range clip holds against."""
        timer = self.ctx.timer
        leaf.requires_grad_(True)
        delta = leaf if x_delta is x_clip else leaf[y]
        with timer("forward"), self.ctx.autocast():
            features, logits = self.surrogate.forward(inputs(x_delta, delta, y))
        with timer("loss"):
            value = loss(features, logits, y)
        with timer("backward"):
            (grad,) = torch.autograd.grad(value, leaf)
        with timer("step"):
            leaf = leaf.detach()
            pgd_step_(leaf, grad, x_clip, eps=self.eps, step_size=step_size, maximize=maximize, mask=mask)
        return leaf, value.detach()

    def classwise(self, batches: list[torch.Tensor], loss: Loss, *, steps: int, step_size: float,
                  maximize: bool = False, flip: bool = False, inputs: InputFn = _plus, desc: str = "PGD") -> dict:
        """As :meth:`per_batch` for a store of one row per class: the rows [C, 3, H, W] take
        ``steps`` steps per batch, each on the gradient summed over the batch's samples of each
        class. The pixel-range clip cannot apply to a perturbation shared by many images (against
        a clean value of 0.5 it is a no-op); each protected image is clipped when written."""
        t0, timer, data = time.perf_counter(), self.ctx.timer, self.data
        self._begin()
        leaf = self.store.all()  # [C, 3, H, W]
        mid = torch.full_like(leaf, 0.5)
        loss_sum = torch.zeros((), device=self.ctx.device)
        seen = 0
        bar = self.ctx.bar(sum(len(b) for b in batches), desc)
        with self.surrogate.frozen():
            try:
                for idx in batches:
                    with timer("data"):
                        x, y = data.clean(idx, flip), data.labels[idx]
                    for _ in range(steps):
                        leaf, value = self._step(leaf, x, mid, y, loss, inputs, step_size, maximize, None)
                    loss_sum += value * len(idx)
                    seen += len(idx)
                    bar.update(len(idx))
                self.store.put(torch.arange(self.store.rows), leaf)
            finally:
                bar.close()
        return dict(poison_loss=float(loss_sum) / max(seen, 1), poison_s=time.perf_counter() - t0)

    def whole_set(self, loss: Loss, *, steps: int, step_size: float, batch_size: int, maximize: bool = False,
                  inputs: InputFn = _plus, desc: str = "PGD (whole set)") -> dict:
        """``steps`` steps, each on one loss of all N samples' features [N, F].

        Per step: the features of every batch without a graph, the loss and its gradient
        w.r.t. them, then per batch the features again with a graph, back-propagated with that
        gradient to the batch's perturbation, which takes its step. The surrogate is in eval
        mode and ``inputs`` must be deterministic, so both passes agree. Memory: [N, F]
        features plus one batch's graph; ``batch_size`` only bounds it. Returns the last
        step's ``poison_loss`` (the loss before that step) and ``poison_s``.
        """
        t0, timer, data = time.perf_counter(), self.ctx.timer, self.data
        self._begin()
        batches = data.ordered(batch_size)
        bar = self.ctx.bar(2 * data.n * steps, desc)
        with self.surrogate.frozen():
            try:
                for _ in range(steps):
                    parts = []
                    for idx in batches:
                        with timer("data"):
                            x, y = data.clean(idx), data.labels[idx]
                        with timer("forward"), torch.no_grad(), self.ctx.autocast():
                            parts.append(self.surrogate.forward(inputs(x, self.store.samples(idx), y))[0].float())
                        bar.update(len(idx))
                    with timer("loss"):
                        features = torch.cat(parts).requires_grad_(True)
                        del parts
                        value = loss(features, None, data.labels)
                        (grad_features,) = torch.autograd.grad(value, features)
                        del features
                    for idx in batches:
                        with timer("data"):
                            x, y = data.clean(idx), data.labels[idx]
                            leaf = self.store.samples(idx).requires_grad_(True)
                            mask = self._mask(idx)
                        with timer("forward"), self.ctx.autocast():
                            f = self.surrogate.forward(inputs(x, leaf, y))[0]
                        with timer("backward"):
                            (grad,) = torch.autograd.grad(f.float(), leaf, grad_outputs=grad_features[idx])
                        with timer("step"):
                            leaf = leaf.detach()
                            pgd_step_(leaf, grad, x, eps=self.eps, step_size=step_size, maximize=maximize, mask=mask)
                            self.store.put(idx, leaf)
                        bar.update(len(idx))
            finally:
                bar.close()
        return dict(poison_loss=float(value.detach()), poison_s=time.perf_counter() - t0)

    def state_dict(self) -> dict:
        return {} if self.mask is None else {"mask": self.mask.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if "mask" in state:
            self.mask = state["mask"].to(self.data.place)
