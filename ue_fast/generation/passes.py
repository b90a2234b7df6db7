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
from .batches import Batches, streamed
from .distributed import gather_rows, global_batch
from .context import RunContext, widened
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
    needs the surrogate trained by then). ``input_transform``, if set, takes the surrogate's
    input of every step, differentiably (``--robust``: the defences it must survive).
    """

    def __init__(self, ctx: RunContext, surrogate: Surrogate, data: Batches, store: PerturbationStore, eps: float):
        self.ctx, self.surrogate, self.data, self.store, self.eps = ctx, surrogate, data, store, eps
        self.mask: torch.Tensor | None = None
        self.mask_source: Callable[[], torch.Tensor] | None = None
        self.input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._labels_all: torch.Tensor | None = None  # under torchrun: every shard's labels (whole-set passes)

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
            z = self.data.draws().randn(len(delta), *delta.shape[1:]).to(delta.device)
            return (z * self.eps).clamp_(-self.eps, self.eps)
        u = self.data.draws().rand(len(delta), *delta.shape[1:]).to(delta.device)
        return (x + (2 * u - 1) * self.eps).clamp_(0, 1) - x

    def _loop(self, batches: list[torch.Tensor], flip: bool, desc: str, run) -> dict:
        """The scaffolding of a batched pass: ``run(idx, x, y)`` takes a batch's steps on its clean
        images x (flipped at random with ``flip``) and labels y and returns its last-step loss; the
        surrogate is frozen throughout. Returns the mean ``poison_loss`` and ``poison_s``."""
        t0, data = time.perf_counter(), self.data
        self._begin()
        loss_sum = torch.zeros((), device=self.ctx.device, dtype=self.ctx.dtype)
        seen = 0
        bar = self.ctx.bar(sum(len(b) for b in batches), desc)
        with self.surrogate.frozen():
            try:
                for idx in streamed(batches):
                    with self.ctx.timer("data"):
                        x, y = data.clean(idx, flip), data.labels[idx]
                    size = data.batch_size(idx)  # the global batch's (the loss is of all of it)
                    loss_sum += run(idx, x, y) * size
                    seen += size
                    bar.update(len(idx))
            finally:
                bar.close()
        return dict(poison_loss=float(loss_sum) / max(seen, 1), poison_s=time.perf_counter() - t0)

    def per_batch(self, batches: list[torch.Tensor], loss: Loss, *, steps: int, step_size: float,
                  maximize: bool = False, flip: bool = False, inputs: InputFn = _plus, init: str = "keep",
                  desc: str = "PGD") -> dict:
        """``steps`` steps per index batch on ``loss`` of the surrogate at ``inputs(x, delta, y)``;
        ``flip``: the clean images are flipped at random first (post-augmentation); ``init``: the
        batch's start (see ``_init``). Returns the mean last-step ``poison_loss`` and ``poison_s``."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")

        def run(idx, x, y):
            with self.ctx.timer("data"):
                mask = self._mask(idx)
                stored = self.store.samples(idx)
                leaf = self._init(init, x, stored)
                if mask is not None and init != "keep":  # a fresh start only where pixels may move
                    leaf = torch.where(mask, leaf, stored)
            for _ in range(steps):
                leaf, value = self._step(leaf, x, y, loss, inputs, step_size, maximize, mask)
            with self.ctx.timer("step"):
                self.store.put(idx, leaf)
            return value

        return self._loop(batches, flip, desc, run)

    def _step(self, leaf, x, y, loss, inputs, step_size, maximize, mask, class_mid=None):
        """One PGD step of ``leaf``, the perturbations [B, 3, H, W] of images x, or with
        ``class_mid`` those [C, 3, H, W] of the classes, whose pixel-range clip holds against
        ``class_mid`` instead of x. Returns the new leaf and the loss before the step."""
        timer = self.ctx.timer
        leaf.requires_grad_(True)
        delta = leaf if class_mid is None else leaf[y]  # [B, 3, H, W]
        with timer("forward"), self.ctx.autocast():
            inp = inputs(x, delta, y)
            if self.input_transform is not None:
                inp = self.input_transform(inp)
            features, logits = self.surrogate.forward(inp)
        with timer("loss"):
            if self.ctx.dist is None:
                value = loss(features, logits, y)
            else:  # the loss of the global batch: every process gathers every part, with gradients
                value = loss(*global_batch((features, logits, y), self.data.part))
        with timer("backward"):
            (grad,) = torch.autograd.grad(value, leaf)
            if self.ctx.dist is not None and class_mid is not None:
                from .distributed import all_sum

                grad = all_sum(grad.contiguous())  # a class's rows take the gradient of all its samples
        with timer("step"):
            leaf = leaf.detach()
            pgd_step_(leaf, grad, x if class_mid is None else class_mid, eps=self.eps, step_size=step_size,
                      maximize=maximize, mask=mask)
        return leaf, value.detach()

    def classwise(self, batches: list[torch.Tensor], loss: Loss, *, steps: int, step_size: float,
                  maximize: bool = False, flip: bool = False, inputs: InputFn = _plus, desc: str = "PGD") -> dict:
        """As :meth:`per_batch` for a store of one row per class: the rows [C, 3, H, W] take
        ``steps`` steps per batch, each on the gradient summed over the batch's samples of each
        class. The pixel-range clip cannot apply to a perturbation shared by many images (against
        a clean value of 0.5 it is a no-op); each protected image is clipped when written."""
        leaf = self.store.all()  # [C, 3, H, W]
        mid = torch.full_like(leaf, 0.5)

        def run(idx, x, y):
            nonlocal leaf
            for _ in range(steps):
                leaf, value = self._step(leaf, x, y, loss, inputs, step_size, maximize, None, class_mid=mid)
            return value

        out = self._loop(batches, flip, desc, run)
        self.store.put(torch.arange(self.store.rows), leaf)
        return out

    def whole_set(self, loss: Loss, *, steps: int, step_size: float, batch_size: int, maximize: bool = False,
                  inputs: InputFn = _plus, adam: "AdamW | None" = None, desc: str = "PGD (whole set)") -> dict:
        """``steps`` steps, each on one loss of all N samples' features [N, F].

        Per step: the features of every batch without a graph, the loss and its gradient
        w.r.t. them, then per batch the features again with a graph, back-propagated with that
        gradient to the batch's perturbation, which takes its step. The surrogate is in eval
        mode and ``inputs`` must be deterministic, so both passes agree. Memory: [N, F]
        features plus one batch's graph; ``batch_size`` only bounds it. Under torchrun each
        process computes its shard's features and all-gathers them (the shards are contiguous
        and in rank order: the whole set's order), so every process computes one process's
        loss and keeps its own rows of the gradient. With ``adam`` each
        step is that optimiser's on ``x + delta`` (then projected) instead of a sign step.
        Returns the last step's ``poison_loss`` (the loss before that step) and ``poison_s``.
        """
        if self.input_transform is not None:
            raise ValueError("a whole-set pass computes every batch twice and needs the same inputs both times: "
                             "it cannot optimise through randomly drawn defences (robust)")
        t0, timer, data = time.perf_counter(), self.ctx.timer, self.data
        self._begin()
        batches = data.ordered(batch_size)
        bar = self.ctx.bar(2 * data.n * steps, desc)
        with self.surrogate.frozen():
            try:
                for _ in range(steps):
                    if adam is not None:
                        adam.begin_step()
                    parts = []
                    for idx in batches:
                        with timer("data"):
                            x, y = data.clean(idx), data.labels[idx]
                        with timer("forward"), torch.no_grad(), self.ctx.autocast():
                            parts.append(widened(self.surrogate.forward(inputs(x, self.store.samples(idx), y))[0]))
                        bar.update(len(idx))
                    with timer("loss"):
                        features = torch.cat(parts).requires_grad_(True)
                        del parts
                        if self.ctx.dist is None:
                            value = loss(features, None, data.labels)
                        else:  # every process's shard, in order: the whole set's [N, F], with gradients
                            value = loss(gather_rows(features), None, self._all_labels())
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
                            (grad,) = torch.autograd.grad(widened(f), leaf, grad_outputs=grad_features[idx])
                        with timer("step"):
                            leaf = leaf.detach()
                            if adam is not None:
                                leaf = adam.step(idx, x, leaf, grad, mask)
                            else:
                                pgd_step_(leaf, grad, x, eps=self.eps, step_size=step_size, maximize=maximize,
                                          mask=mask)
                            self.store.put(idx, leaf)
                        bar.update(len(idx))
            finally:
                bar.close()
        return dict(poison_loss=float(value.detach()), poison_s=time.perf_counter() - t0)

    def _all_labels(self) -> torch.Tensor:
        """The labels of every process's shard, in the whole set's order (gathered once)."""
        if self._labels_all is None:
            self._labels_all = gather_rows(self.data.labels)
        return self._labels_all

    def state_dict(self) -> dict:
        return {} if self.mask is None else {"mask": self.mask.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if "mask" in state:
            self.mask = state["mask"].to(self.data.place)


class AdamW:
    """AdamW on the perturbed images ``p = x + delta`` of a store, one batch of rows at a time.

    torch.optim.AdamW's single-tensor update, written per element so each batch of a
    whole-set pass updates its own rows (``begin_step`` counts the shared step t)::

        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) m / (sqrt(v / (1 - b2^t)) + eps_adam)

    with ``g = -grad_scale * grad`` when ``maximize``; then ``delta = p - x`` is projected to
    the eps ball and ``x + delta`` to [0, 1] (with a mask, only masked pixels move). The
    moments are float32 [R, 3, H, W] on the store's place, saved in checkpoints.
    """

    def __init__(self, store: PerturbationStore, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = True, grad_scale: float = 1.0):
        self.store, self.lr, self.wd, self.betas, self.eps = store, lr, weight_decay, betas, eps
        self.maximize, self.grad_scale = maximize, grad_scale
        self.m = torch.zeros(store.delta.shape, dtype=torch.float32, device=store.place)
        self.v = torch.zeros_like(self.m)
        self.t = 0

    def begin_step(self) -> None:
        self.t += 1

    def step(self, idx, x, delta, grad, mask=None) -> torch.Tensor:
        """The new delta [B, 3, H, W] of rows ``idx`` for clean x, current delta and its gradient."""
        b1, b2 = self.betas
        rows = idx.to(self.store.place)
        g = grad.float() * (-self.grad_scale if self.maximize else self.grad_scale)
        m = self.m[rows].to(g.device).lerp_(g, 1 - b1)
        v = self.v[rows].to(g.device).mul_(b2).addcmul_(g, g, value=1 - b2)
        self.m[rows], self.v[rows] = m.to(self.store.place), v.to(self.store.place)
        denom = (v.sqrt() / (1 - b2 ** self.t) ** 0.5).add_(self.eps)
        p = (x + delta).mul_(1 - self.lr * self.wd).addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))
        new = (p - x).clamp_(-self.store.eps, self.store.eps)
        new = (x + new).clamp_(0, 1) - x
        return new if mask is None else torch.where(mask, new, delta)

    def state_dict(self) -> dict:
        return {"m": self.m.cpu(), "v": self.v.cpu(), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
        self.t = int(state["t"])
