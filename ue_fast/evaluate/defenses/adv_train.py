"""adv-train: PGD adversarial training of the victim (Madry et al. 2018)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...ops import pgd_step_
from ...ops._checks import check_int
from .base import Defense, _check_batch, _device_gen, _float_option


@dataclass(frozen=True)
class AdversarialTraining(Defense):
    """PGD adversarial training (Madry et al. 2018): cross-entropy on
    x_adv ~ argmax_{|d| <= eps, x + d in [0, 1]} CE(model(x + d), y), found by ``steps``
    ascent steps of ``step_size`` (default eps / 4: 2/255 at 8/255, as Rice et al. 2020 and
    APBench's ``MadrysLoss``; 1/255 at 4/255), each one ``ue_fast.pgd_step_``.

    ``norm``: "linf" (signed-gradient steps, from a uniform random start in the ball) or "l2"
    (steps along the normalised gradient, the perturbation's L2 norm over the whole image kept
    within ``eps``, from a random direction of length ``step_size``, as APBench's L_2 branch).
    ``eps`` is a fraction of the pixel range in both (8/255 by default; an L2 radius of 0.5,
    common on CIFAR, is eps=0.5).

    The attack runs in the model's current mode, train mode in the victim loop, as the
    PyTorch PGD-AT recipes of UE papers do (Rice et al.'s ``attack_pgd``): its batch
    statistics then match the outer step's, which trains on the same batch (its forwards
    also update BN running statistics, as there). APBench's ``MadrysLoss`` attacks in eval
    mode instead. Gradients are taken w.r.t. the input only, so no parameter ``.grad`` is
    touched."""

    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    name: ClassVar[str] = "adv-train"

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        top = 1.0 if self.norm == "linf" else math.inf
        object.__setattr__(self, "eps", _float_option("eps", self.eps, 0.0, top))
        object.__setattr__(self, "steps", check_int("steps", self.steps, 1))
        step = self.eps / 4 if self.step_size is None else _float_option("step_size", self.step_size, 0.0, top)
        object.__setattr__(self, "step_size", step)

    def perturb(self, model, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x [B, 3, H, W] in [0, 1] -> x_adv [B, 3, H, W] in [0, 1], |x_adv - x| <= eps in ``norm``."""
        _check_batch(x, y, gen)
        x = x.detach()
        noise_gen = _device_gen(gen, x.device)
        if self.norm == "linf":
            start = torch.rand(x.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
            delta = (2 * start - 1) * self.eps
        else:
            start = torch.randn(x.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
            norms = start.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = start * (min(self.step_size, self.eps) / norms)
        delta = (x + delta).clamp_(0, 1) - x
        with torch.enable_grad():
            for _ in range(self.steps):
                delta.requires_grad_(True)
                _, logits = model(x + delta)
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), delta)
                delta = delta.detach()
                pgd_step_(delta, grad, x, eps=self.eps, step_size=self.step_size, norm=self.norm, maximize=True)
        return (x + delta).clamp_(0, 1)

    def _loss(self, model, x, y, gen):
        _, logits = model(self.perturb(model, x, y, gen))
        return F.cross_entropy(logits, y), logits
