"""The surrogate network of a bi-level method: model, compiled forward, optimiser, autocast.

``fit`` trains it on the batches a method gives it, with the options the papers
need (inputs built per batch by the method: clean or perturbed, augmented or not;
gradient-norm clipping; any number of batches); ``reinit`` draws fresh weights from
a seed; ``frozen`` holds it in eval mode with its weights out of the graph (the PGD
passes); ``accuracy`` scores it on inputs the method builds.

The methods' recipes are SGD. A transformer surrogate (``vit-small``, ``cait-small``),
which SGD at the methods' rates does not train, takes its architecture's optimiser
instead (``ue_fast.models.RECIPES``: AdamW, lr 1e-3, weight decay 0.05), and the
method's learning rates are scaled by 1e-3 / the method's base lr, so its schedule
keeps its shape.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..models import build_model, make_optimizer, recipe
from .batches import Plan, streamed
from .context import RunContext, widened


def compiled(model: torch.nn.Module, mode: bool | str):
    """``model`` itself (mode False), or ``torch.compile(model, mode=...)``; True means "default".
    ``mode`` is a validated ``RunContext.compile``."""
    if not mode:
        return model
    return torch.compile(model, mode="default" if mode is True else mode)


Inputs = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # index batch -> (input, labels)


class Surrogate:
    """A ``build_model(arch)`` network (weights seeded by ``seed``) with SGD (or, for a transformer,
    AdamW: see the module docstring) and the run's options.

    ``forward`` is the network as called in the loops (``torch.compile``'d on request);
    parameters and ``state_dict`` are those of ``model``.
    """

    def __init__(self, ctx: RunContext, arch: str, num_classes: int, image_size: int, *, seed: int, lr: float,
                 momentum: float, weight_decay: float, nesterov: bool = False):
        self.ctx, self.arch, self.num_classes, self.image_size = ctx, arch, num_classes, image_size
        self.input_transform = None  # --robust: fit() trains on its images' defended forms
        torch.manual_seed(seed)  # model initialisation
        self.model = build_model(arch, num_classes, image_size=image_size).to(ctx.device, ctx.dtype)
        if ctx.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = compiled(self.model, ctx.compile)
        self.train_forward = self.forward
        if ctx.dist is not None:  # torchrun: DistributedDataParallel (global-batch batch norm on request)
            from torch.nn.parallel import DistributedDataParallel

            from .distributed import sync_batch_norm

            if ctx.sync_bn:
                self.model = sync_batch_norm(self.model, ctx.device)
                self.forward = compiled(self.model, ctx.compile)
            ddp = DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                          else None)
            self.train_forward = compiled(ddp, ctx.compile)
        r = recipe(arch)
        if r["optimizer"] == "sgd":
            self.lr_scale = 1.0
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum,
                                             weight_decay=weight_decay, nesterov=nesterov)
        else:
            self.lr_scale = r["lr"] / lr
            self.optimizer = make_optimizer(self.model.parameters(), arch)

    def reinit(self, seed: int) -> None:
        """Fresh weights drawn from ``seed`` (the global RNG is left as it was) and no momentum."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = build_model(self.arch, self.num_classes, image_size=self.image_size)
        self.model.load_state_dict(fresh.state_dict())  # in place: the compiled handle stays valid
        self.optimizer.state.clear()

    def fit(self, batches: Iterable[torch.Tensor], inputs: Inputs, *, lr: float, clip_grad_norm: float | None = None,
            desc: str = "surrogate") -> dict:
        """One SGD step of cross-entropy per index batch on ``inputs(idx)`` (built just before its
        step), in train mode at learning rate ``lr``; ``clip_grad_norm`` clips the gradient's
        total norm first. Returns the mean ``train_loss``, ``train_acc`` and ``train_s``.

        Under torchrun each process steps on its part of every global batch with the loss
        ``sum of its cross-entropies x world / global batch size``: DistributedDataParallel's
        average of the gradients is then the one-process gradient of the mean."""
        t0 = time.perf_counter()
        timer = self.ctx.timer
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_scale
        self.model.train()
        loss_sum = torch.zeros((), device=self.ctx.device, dtype=self.ctx.dtype)
        correct = torch.zeros((), device=self.ctx.device, dtype=torch.int64)
        seen = 0
        if not isinstance(batches, list):
            batches = list(batches)
        bar = self.ctx.bar(sum(len(b) for b in batches), desc)
        dist = self.ctx.dist
        data = batches.data if isinstance(batches, Plan) else None
        for idx in streamed(batches):
            with timer("data"):
                x, y = inputs(idx)
            if self.input_transform is not None:  # --robust: trained on defended inputs
                with timer("defences"), torch.no_grad():
                    x = self.input_transform(x)
            with timer("surrogate training"):
                if dist is None:
                    with self.ctx.autocast():
                        _, logits = self.forward(x)
                        loss = F.cross_entropy(widened(logits), y)
                    size, total = len(idx), loss.detach() * len(idx)
                else:
                    size = data.batch_size(idx) if data is not None else len(idx)
                    with self.ctx.autocast():
                        _, logits = self.train_forward(x)
                        total = F.cross_entropy(widened(logits), y, reduction="sum")
                    loss = total * (dist.world / size)
                    total = total.detach()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip_grad_norm)
                self.optimizer.step()
                loss_sum += total
                correct += (logits.argmax(1) == y).sum()
                seen += size
            bar.update(len(idx))
        bar.close()
        if dist is not None:
            from .distributed import all_sum

            both = all_sum(torch.stack([loss_sum.double(), correct.double()]))
            loss_sum, correct = both[0], both[1]
        return dict(train_loss=float(loss_sum) / max(seen, 1), train_acc=float(correct) / max(seen, 1),
                    train_s=time.perf_counter() - t0)

    @contextlib.contextmanager
    def frozen(self):
        """Eval mode, weights out of the graph (restored afterwards)."""
        was_training = self.model.training
        flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        self.model.requires_grad_(False)
        try:
            yield self
        finally:
            self.model.train(was_training)
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)

    @torch.no_grad()
    def accuracy(self, batches: Iterable[torch.Tensor], inputs: Inputs) -> float:
        """Accuracy on ``inputs(idx)`` over the index batches, in eval mode."""
        self.model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.ctx.device)
        seen = 0
        data = batches.data if isinstance(batches, Plan) else None
        for idx in streamed(batches):
            x, y = inputs(idx)
            with self.ctx.autocast():
                _, logits = self.forward(x)
            correct += (logits.argmax(1) == y).sum()
            seen += data.batch_size(idx) if data is not None else len(idx)
        if self.ctx.dist is not None:
            from .distributed import all_sum

            correct = all_sum(correct)
        return float(correct) / max(seen, 1)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
