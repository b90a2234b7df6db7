"""Input transforms of the passes and of surrogate training, differentiable in the perturbation.

- :func:`shift_flip`: a bilinear random translation and horizontal flip (AP/TAP's
  differentiable augmentation at every PGD step);
- :func:`random_crop_flip`: torchvision's flip + zero-padded random crop as a gather
  (REM's training augmentation and its expectation over transformations);
- :func:`contrastive_augment`: SimCLR-style strong augmentation (random resized crop, flip,
  colour jitter, grayscale) at a ``strength``, per sample and differentiable (AUE/AAP);
- :class:`Adversary`: an inner L-inf PGD adversary rho maximising the surrogate's
  cross-entropy (REM's min-min-max).
"""
from __future__ import annotations

import math

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


_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL, torchvision and kornia


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] of RGB x [B, 3, H, W]."""
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB [B, 3, H, W] in [0, 1] -> HSV, each in [0, 1] (torchvision's formulas), differentiable
    almost everywhere."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV [B, 3, H, W] in [0, 1] -> RGB (torchvision's formulas)."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = torch.remainder(i, 6).long()
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                     (v, p, q))])  # [6, B, 3, H, W]
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def _brightness(x, f):
    return (x * f).clamp(0, 1)


def _contrast(x, f):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def _saturation(x, f):
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


def _hue(x, f):
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(torch.cat([torch.remainder(hsv[:, :1] + f, 1.0), hsv[:, 1:]], 1))


_JITTER = (_brightness, _contrast, _saturation, _hue)  # torchvision's definitions, each clipped to [0, 1]


def _jitter(x: torch.Tensor, f: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The four jitter operations on each sample of x in its own ``order`` [B, 4] (a permutation of
    0..3 per row): per slot, each operation runs on the samples that take it there, so every
    sample pays four operations."""
    for slot in range(4):
        out = x
        for k, op in enumerate(_JITTER):
            sel = torch.nonzero(order[:, slot] == k).squeeze(1)
            if len(sel):
                out = out.index_copy(0, sel, op(x.index_select(0, sel), f.index_select(0, sel)[:, k].view(-1, 1, 1, 1)))
        x = out
    return x


# Per-sample uniform draws of one contrastive_augment call, in this order.
CONTRASTIVE_DRAWS = 15  # area, log-ratio, x0, y0, flip, jitter?, 4 jitter factors, gray?, 4 order keys


def contrastive_augment(x: torch.Tensor, u: torch.Tensor, strength: float,
                        crop_min: float | None = None) -> torch.Tensor:
    """AUE/AAP's strong augmentation at ``strength`` s (their ``utils.Augment(s).aug_cl``), per
    sample, differentiable in x: a random resized crop (area fraction in
    ``[max(1 - 0.9 s, 0.05), 1]``, aspect ratio in [3/4, 4/3] log-uniform, bilinear), a
    horizontal flip (p 1/2), a colour jitter (brightness, contrast and saturation factors in
    ``[1 - 0.4 s, 1 + 0.4 s]``, hue shift in ``[-0.1 s, 0.1 s]`` turns, in a random order, with
    probability ``min(0.99, 0.8 s)``) and grayscale (p ``0.2 s``).

    x [B, 3, H, W] in [0, 1]; ``u`` [B, CONTRASTIVE_DRAWS] uniform in [0, 1) (the caller draws
    it from the run's generator). A crop wider or taller than the image is clipped to it (torchvision
    and kornia redraw it up to 10 times instead). ``crop_min``: the smallest area fraction of the
    crop instead of ``max(1 - 0.9 s, 0.05)`` (SimCLR's 0.2 for the contrastive learners).
    """
    b, c, h, w = x.shape
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = u.to(device=x.device, dtype=dt)
    s = float(strength)
    lo = max(1 - 0.9 * s, 0.05) if crop_min is None else float(crop_min)
    area = lo + (1 - lo) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
    cw = torch.sqrt(area * ratio * h * w).clamp(max=w)  # crop size in pixels
    ch = torch.sqrt(area / ratio * h * w).clamp(max=h)
    x0 = (w - cw) * u[:, 2]
    y0 = (h - ch) * u[:, 3]
    # affine_grid with align_corners=True: output pixel centres -1..1 <- input pixels x0..x0+cw-1.
    sx = (cw - 1).clamp(min=0) / max(w - 1, 1)
    sy = (ch - 1).clamp(min=0) / max(h - 1, 1)
    tx = (2 * x0 + cw - 1) / max(w - 1, 1) - 1
    ty = (2 * y0 + ch - 1) / max(h - 1, 1) - 1
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0).to(dt)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=dt)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=True).to(x.dtype)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    if s <= 0:
        return out
    # Colour jitter on the samples it applies to, its four operations in a per-sample random order.
    jb, js = 0.4 * s, 0.1 * s
    factors = torch.stack([1 - jb + 2 * jb * u[:, 6], 1 - jb + 2 * jb * u[:, 7], 1 - jb + 2 * jb * u[:, 8],
                           -js + 2 * js * u[:, 9]], 1).to(x.dtype)
    order = u[:, 11:15].argsort(1)  # [B, 4]
    on = torch.nonzero(u[:, 5] < min(0.99, 0.8 * s)).squeeze(1)  # the samples the jitter applies to
    if len(on):
        out = out.index_copy(0, on, _jitter(out.index_select(0, on), factors.index_select(0, on),
                                            order.index_select(0, on)))
    gray = (u[:, 10] < 0.2 * s).view(-1, 1, 1, 1)
    return torch.where(gray, _gray(out).expand(-1, c, -1, -1), out)


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
