"""Training-free availability poisons: OPS, LSP and AR, vectorised on the device.

Each method draws or searches a class-wise *pattern* with no surrogate network,
so ``protect`` runs in seconds even for large sets. All randomness comes from the
run's seeded CPU generator, so a seed fixes the result. Their settings are their
own and ``eps``/``seed``: no surrogate settings.

- ``ops`` (One-Pixel Shortcut, Wu et al., ICLR 2023): for each class, the pixel
  position p and binary colour v in {0, 1}^3 maximising
  ``mean(|v - x_p|) / std(|v - x_p|)`` over the class's images and channels, i.e. a
  colour far from, and consistently far from, what the class shows there; that
  pixel of every image of the class is set to v. A (p, v) pair already taken by
  an earlier class is not reused. An L0 attack: the changed pixel moves by up to
  1, so its default eps is 255/255 (perturbations stored as float32).
- ``lsp`` (linearly separable perturbations, Yu et al., KDD 2022): a class-separable
  synthetic data set in ``3 * G * G`` dimensions (class centres at random vertices
  of a hypercube of half-side ``class_sep`` = 10, unit Gaussian spread; one sample
  per image), each sample shaped into a G x G grid of colour patches, upsampled to
  the image, and scaled to an L2 norm of ``rms * sqrt(3 H W)`` with ``rms`` = 6/255
  (the public code's setting), then clipped to eps.
- ``ar`` (autoregressive perturbations, Sandoval-Segura et al., NeurIPS 2022): per
  class and channel an AR process on a 3 x 3 causal window,
  ``x[i, j] = sum_(a, b) w[a, b] x[i - 2 + a, j - 2 + b]`` over the 8 earlier pixels
  of the window (weights drawn Gaussian, normalised to sum 1, and redrawn if the
  process diverges), started from Gaussian noise in the first two rows and
  columns, generated on an (H + 4) x (W + 4) canvas whose first four rows and
  columns are cropped, scaled per image to the paper's L2 norm ``l2`` = 1 and
  clipped to eps (default 16/255, which the clip touches in about 1% of values;
  at 8/255 the peaks are cut). The recurrence runs over
  anti-diagonal wavefronts (2i + j constant), about 3H vectorised steps, not
  per pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import TrainingFreeMethod
from .settings import Config, int_setting, real_setting


# ----------------------------------------------------------------------------- OPS
@dataclass
class OPSConfig(Config):
    """One-Pixel Shortcut; ``eps`` bounds the one changed pixel (default: unbounded, 255/255)."""

    eps: float = 1.0
    pixels: int = 1  # pixels per class (the paper's sparsity 1)

    def validate(self) -> None:
        super().validate()
        int_setting("pixels", self.pixels)


def ops_search(images: torch.Tensor, labels: torch.Tensor, num_classes: int, pixels: int = 1):
    """Per class the ``pixels`` best (position, colour) pairs of the OPS objective.

    images: uint8 [N, 3, H, W]. Returns positions long [C, pixels] (flat h * W + w) and
    colours float [C, pixels, 3] in {0, 1}. Uses per-class first and second moments
    only: with v in {0, 1}, |v - x| is x or 1 - x, so mean and std over the class's
    images and channels follow from sum x and sum x^2 per pixel and channel.
    """
    return ops_choose(*ops_moments(images, labels, num_classes), pixels)


def ops_moments(images: torch.Tensor, labels: torch.Tensor, num_classes: int, moments=None):
    """Per class the sums of x and x^2 per channel and pixel (float64 [C, 3, HW] each) and the
    image counts (float64 [C]) of uint8 ``images`` [N, 3, H, W], added to ``moments`` (those
    of earlier chunks of the same set; the sums run in the images' order, so chunks give the
    sums of the whole set bit for bit)."""
    n, c, h, w = images.shape
    x = images.flatten(2).float().div_(255)  # [N, 3, HW]
    if moments is None:
        s1 = torch.zeros(num_classes, c, h * w, dtype=torch.float64, device=x.device)
        moments = (s1, torch.zeros_like(s1), torch.zeros(num_classes, dtype=torch.float64, device=x.device))
    s1, s2, cnt = moments
    s1.index_add_(0, labels, x.double())
    s2.index_add_(0, labels, x.double().square())
    cnt += torch.bincount(labels, minlength=num_classes).double()
    return moments


def ops_choose(s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor, pixels: int = 1):
    """:func:`ops_search`'s choice from the class moments of :func:`ops_moments`."""
    num_classes, c, hw = s1.shape
    cnt = count[:, None, None]  # [C, 1, 1]
    colours = torch.tensor([[(v >> 2) & 1, (v >> 1) & 1, v & 1] for v in range(8)], dtype=torch.float64,
                           device=s1.device)  # [8, 3]
    vc = colours[:, None, :, None]  # [8, 1, 3, 1]
    # Per class, colour, channel, pixel: sum of |v - x| and of its square over the class's images.
    m1 = torch.where(vc > 0, cnt - s1[None], s1[None])  # [8, C, 3, HW]
    m2 = torch.where(vc > 0, cnt - 2 * s1[None] + s2[None], s2[None])
    total = (3 * cnt)[None]  # [1, C, 1, 1]
    mean = m1.sum(2, keepdim=True) / total
    var = (m2.sum(2, keepdim=True) / total - mean.square()).clamp_min(0)
    score = (mean / var.sqrt().clamp_min(1e-12)).squeeze(2)  # [8, C, HW]
    score = score.permute(1, 2, 0).reshape(num_classes, hw * 8)  # [C, HW * 8], index = p * 8 + v
    taken = torch.zeros(hw * 8, dtype=torch.bool, device=s1.device)
    pos = torch.empty(num_classes, pixels, dtype=torch.long, device=s1.device)
    col = torch.empty(num_classes, pixels, 3, dtype=torch.float32, device=s1.device)
    for k in range(num_classes):  # classes in order: a (p, v) pair taken by one is barred for the next
        s = score[k].masked_fill(taken, -math.inf)
        best = s.topk(pixels).indices
        taken[best] = True
        pos[k], col[k] = best // 8, colours[best % 8].float()
    return pos, col


class OPS(TrainingFreeMethod):
    """One-Pixel Shortcut (Wu et al., ICLR 2023); see the module docstring."""

    name = "ops"
    config_class = OPSConfig

    def begin(self, chunks, gen, device):
        moments = None
        for images, labels in chunks():  # the class moments, chunk by chunk
            moments = ops_moments(images.to(device), labels.to(device), self.num_classes, moments)
        self.pos, self.col = ops_choose(*moments, self.config.pixels)

    def rows(self, images, labels, gen, device):
        n, c, h, w = images.shape
        x = images.flatten(2).float().div(255)  # [N, 3, HW]
        delta = torch.zeros_like(x)
        p = self.pos[labels]  # [N, pixels]
        target = self.col[labels].transpose(1, 2)  # [N, 3, pixels]
        idx = p[:, None, :].expand(-1, c, -1)
        delta.scatter_(2, idx, target - x.gather(2, idx))
        return delta.view(n, c, h, w)


# ----------------------------------------------------------------------------- LSP
@dataclass
class LSPConfig(Config):
    """Linearly separable patches; ``patch`` None: 8 px up to 64 px images, else 32 px."""

    patch: int | None = None
    class_sep: float = 10.0
    rms: float = 6 / 255  # L2 norm = rms * sqrt(3 H W)

    def validate(self) -> None:
        super().validate()
        if self.patch is not None:
            int_setting("patch", self.patch)
        real_setting("class_sep", self.class_sep)
        real_setting("rms", self.rms)


class LSP(TrainingFreeMethod):
    """Linearly separable perturbations (Yu et al., KDD 2022); see the module docstring."""

    name = "lsp"
    config_class = LSPConfig

    def _grid(self, h: int, w: int) -> tuple[int, int, int]:
        patch = self.config.patch or (8 if max(h, w) <= 64 else 32)
        return patch, math.ceil(h / patch), math.ceil(w / patch)

    def begin(self, chunks, gen, device):
        _, c, h, w = self.shape
        _, gh, gw = self._grid(h, w)
        dim = c * gh * gw
        # Distinct random hypercube vertices as class centres (distinct while 2^dim >= C).
        centres = torch.empty(0, dim)
        while len(centres) < self.num_classes:
            cand = torch.randint(0, 2, (self.num_classes, dim), generator=gen).float() * 2 - 1
            centres = torch.unique(torch.cat([centres, cand]), dim=0)
        self.centres = centres[torch.randperm(len(centres), generator=gen)[: self.num_classes]] * self.config.class_sep

    def rows(self, images, labels, gen, device):
        n, c, h, w = images.shape
        cfg = self.config
        patch, gh, gw = self._grid(h, w)
        feats = self.centres[labels.cpu()] + torch.randn(n, c * gh * gw, generator=gen)  # [N, dim]
        grid = feats.view(n, c, gh, gw).to(device)
        noise = grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]  # [N, 3, H, W]
        norm = noise.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return noise / norm * (cfg.rms * math.sqrt(c * h * w))


# ----------------------------------------------------------------------------- AR
@dataclass
class ARConfig(Config):
    """Autoregressive perturbations: class-wise processes, per-image noise of L2 norm ``l2``, clipped to eps."""

    eps: float = 16 / 255
    l2: float = 1.0
    max_tries: int = 200  # redraws of a diverging process's weights

    def validate(self) -> None:
        super().validate()
        real_setting("l2", self.l2)
        int_setting("max_tries", self.max_tries)


# The 8 causal neighbours of (i, j) in its 3 x 3 window (rows i-2..i, columns j-2..j).
_OFFSETS = [(a - 2, b - 2) for a in range(3) for b in range(3) if (a, b) != (2, 2)]


def ar_process(weights: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Run the AR recurrence on ``start`` [N, 3, H, W] (rows/columns >= 2 overwritten).

    weights: [N, 3, 8], one weight per causal neighbour in ``_OFFSETS`` order.
    Wavefront t = 2i + j: every neighbour of (i, j) has a smaller t.
    """
    x = start.clone()
    n, c, h, w = x.shape
    flat = x.view(n, c, h * w)
    ii, jj = torch.meshgrid(torch.arange(2, h), torch.arange(2, w), indexing="ij")
    t = (2 * ii + jj).flatten()
    ii, jj = ii.flatten(), jj.flatten()
    for step in torch.unique(t).tolist():
        sel = t == step
        i, j = ii[sel].to(x.device), jj[sel].to(x.device)
        nb = torch.stack([(i + di) * w + (j + dj) for di, dj in _OFFSETS])  # [8, P]
        vals = flat[:, :, nb]  # [N, 3, 8, P]
        flat[:, :, i * w + j] = (weights[..., None] * vals).sum(2)
    return x


class AR(TrainingFreeMethod):
    """Autoregressive perturbations (Sandoval-Segura et al., NeurIPS 2022); see the module docstring."""

    name = "ar"
    config_class = ARConfig

    def _class_weights(self, gen: torch.Generator) -> torch.Tensor:
        """[C, 3, 8] weights summing to 1 per channel, each redrawn until a probe run stays bounded.

        All C x 3 processes are drawn and probed as one batch; only the rejected ones are redrawn.
        """
        shape = (self.num_classes, 3)
        out = torch.empty(*shape, 8)
        todo = torch.ones(shape, dtype=torch.bool)
        probe = torch.randn(1, 1, 36, 36, generator=gen)
        for _ in range(self.config.max_tries):
            wts = torch.randn(*shape, 8, generator=gen, dtype=torch.float64)
            total = wts.sum(2, keepdim=True)
            wts = (wts / total).float()
            run = ar_process(wts, probe.expand(*shape, 36, 36))
            peak = run.flatten(2).abs().amax(2)  # [C, 3]; NaN for a diverged process
            ok = todo & (total[..., 0].abs() >= 0.1) & (peak < 50 * float(probe.abs().max()))
            out[ok] = wts[ok]
            todo &= ~ok
            if not todo.any():
                return out
        raise RuntimeError(f"no stable AR process found in {self.config.max_tries} draws")

    def begin(self, chunks, gen, device):
        self.weights = self._class_weights(gen).to(device)  # [C, 3, 8]

    def rows(self, images, labels, gen, device):
        n, c, h, w = images.shape
        weights = self.weights
        start = torch.randn(n, c, h + 4, w + 4, generator=gen).to(device)
        chunk = max(1, 2 ** 22 // ((h + 4) * (w + 4) * c))  # bound the [chunk, 3, 8, P] gathers
        parts = []
        for s in range(0, n, chunk):
            x = ar_process(weights[labels[s:s + chunk]], start[s:s + chunk])[:, :, 4:, 4:]
            norm = x.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
            parts.append(x / norm * self.config.l2)
        return torch.cat(parts)


TRAINING_FREE = {"ops": OPS, "lsp": LSP, "ar": AR}

__all__ = ["AR", "ARConfig", "LSP", "LSPConfig", "OPS", "OPSConfig", "TRAINING_FREE", "ar_process", "ops_search"]
