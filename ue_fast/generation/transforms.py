"""Input transforms of the passes and of surrogate training, differentiable in the perturbation.

- :func:`shift_flip`: a bilinear random translation and horizontal flip (AP/TAP's
  differentiable augmentation at every PGD step);
- :func:`random_crop_flip`: torchvision's flip + zero-padded random crop as a gather
  (REM's training augmentation and its expectation over transformations);
- :class:`Adversary`: an inner L-inf PGD adversary rho maximising the surrogate's
  cross-entropy (REM's min-min-max).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models._layers import CIFAR10_MEAN
from ..ops import pgd_step_
from .batches import Draws
from .context import widened


def shift_flip(x: torch.Tensor, u: torch.Tensor, max_shift: float) -> torch.Tensor:
    """Differentiable random translation and horizontal flip of images x [B, 3, H, W].

    ``u`` [B, 3] uniform in [0, 1): the shifts are ``(2 u[:, 0] - 1) max_shift`` and
    ``(2 u[:, 1] - 1) max_shift`` pixels (bilinear), a flip where ``u[:, 2] < 1/2``.
    Pixels from outside are the CIFAR-10 mean colour.
    """
    b, c, h, w = x.shape
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # the grid's (float32 under bf16)
    u = u.to(device=x.device, dtype=dt)
    # affine_grid works in [-1, 1] with align_corners=True: one pixel is 2 / (size - 1).
    tx = (2 * u[:, 0] - 1) * max_shift * 2 / max(w - 1, 1)
    ty = (2 * u[:, 1] - 1) * max_shift * 2 / max(h - 1, 1)
    sx = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=dt)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = 1.0, ty
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=True).to(x.dtype)
    mean = torch.tensor(CIFAR10_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    out = F.grid_sample(x - mean, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out + mean


def random_crop_flip(x: torch.Tensor, padding: int, gen: "torch.Generator | Draws") -> torch.Tensor:
    """Per sample: a horizontal flip with probability 1/2, then a random H x W crop of x
    zero-padded by ``padding`` (torchvision's RandomHorizontalFlip + RandomCrop(size, padding)).

    x [B, C, H, W] -> [B, C, H, W]; a gather, so differentiable in x. Offsets and flips
    are drawn from the CPU generator ``gen`` (or a batch's :class:`~.batches.Draws`).
    """
    b, _, h, w = x.shape
    d = gen if isinstance(gen, Draws) else Draws(gen)
    i = d.randint(2 * padding + 1, b)
    j = d.randint(2 * padding + 1, b)
    flip = d.rand(b) < 0.5
    rows = i[:, None] + torch.arange(h)  # [B, H]
    cols = torch.arange(w).expand(b, w)
    # Flipping the padded image and cropping at offset j reads the same pixels as
    # reading a crop at offset 2p - j backwards; both offsets are uniform.
    cols = torch.where(flip[:, None], cols.flip(1), cols) + j[:, None]  # [B, W]
    xp = F.pad(x, (padding,) * 4)  # zeros: black borders, as RandomCrop's default fill
    dev = x.device
    out = xp[torch.arange(b, device=dev)[:, None, None], :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]
    return out.permute(0, 3, 1, 2)  # advanced indices first: [B, H, W, C] -> [B, C, H, W]


class Adversary:
    """rho approximately maximising ``CE(f(x + rho), y)`` over ``|rho|_inf <= eps``, ``x + rho``
    in [0, 1]: ``steps`` sign steps of ``step_size`` from a uniform random start (drawn from
    ``gen``, a CPU generator, or a function giving the current batch's :class:`~.batches.Draws`),
    with the surrogate frozen in eval mode (restored afterwards).

    Each sample's rho depends on its own loss only (the mean's scale does not change a sign
    step), so under torchrun each process attacks its own samples, with no communication."""

    def __init__(self, surrogate, gen, *, eps: float, steps: int, step_size: float):
        self.surrogate, self.gen, self.eps, self.steps, self.step_size = surrogate, gen, eps, steps, step_size

    def __call__(self, x: torch.Tensor, y: torch.Tensor, views: int = 1) -> torch.Tensor:
        """rho [B, C, H, W] (detached) for inputs x [B, C, H, W] in [0, 1]; ``views`` > 1: x holds
        that many view-major blocks of a batch's samples (see :class:`~.batches.Draws`)."""
        x = widened(x.detach())
        if self.steps == 0 or self.eps == 0:
            return torch.zeros_like(x)
        s = self.surrogate
        draws = Draws(self.gen) if isinstance(self.gen, torch.Generator) else self.gen()
        with s.frozen():
            rho = (draws.rand(len(x), *x.shape[1:], views=views).to(x.device) * 2 - 1) * self.eps
            rho = (x + rho).clamp_(0, 1) - x
            for _ in range(self.steps):
                rho.requires_grad_(True)
                with s.ctx.autocast():
                    _, logits = s.forward(x + rho)
                loss = F.cross_entropy(widened(logits), y)
                (grad,) = torch.autograd.grad(loss, rho)
                rho = rho.detach()
                pgd_step_(rho, grad, x, eps=self.eps, step_size=self.step_size, maximize=True)
        return rho
