"""op: orthogonal projection (Sandoval-Segura et al., "What Can We Learn from Unlearnable
Datasets?", NeurIPS 2023).

A linear model fitted to the protected training set learns the class-wise shortcut a poison
plants; projecting every image onto the orthogonal complement of the model's class directions
removes it before the victim trains. The procedure, as the authors' code runs it
(psandovalsegura/learn-from-unlearnable @ 605dea2, ``orthogonal_projection_step_1.py``
L21-62, ``utils_projection.py`` L4-26, called from ``orthogonal_projection_step_2.py``
L165-185):

1. Fit ``W`` (C x D, D = 3 H W, no bias) on the flattened training images in [0, 1] (no
   normalisation, no augmentation): softmax cross-entropy, plain SGD (no momentum, no weight
   decay) at lr 0.1 for 20 epochs in batches of 1,024 in the data set's order (their loader
   does not shuffle), the lr divided by 10 after half and three quarters of the epochs; ``W``
   starts as ``nn.Linear``'s default, U(-1/sqrt(D), 1/sqrt(D)).
2. Normalise each of the C rows of ``W`` (every class's, not the image's own), orthonormalise
   them by a reduced QR: ``Q`` (D x C).
3. Project every image: ``x - (x Q) Q^T``.

What differs, and why:

- The projected images are clamped to [0, 1] and rounded to 8 bits, since every defence
  here hands the victim loop uint8 images. The authors keep floats, but their default victim
  pipeline (strong augmentation) passes every image through torchvision's ``ColorJitter``,
  which clamps to [0, 1]; rounding adds at most 1/510.
- On a set smaller than CIFAR-10, ``epochs`` (default None) grows so that the fit takes at
  least the 980 SGD steps of their run (20 epochs of 49 batches of 50,000 images): 20 epochs
  of a 1,000-image set are 20 steps, after which the linear model has not learnt the shortcut
  (measured on the demo images with a class-wise +-8/255 pattern: 36% training accuracy and a
  quarter of the patterns' norm in the span of W, against 99% and 0.81 at 400 steps). An
  explicit ``epochs`` is taken as given.
- Their projection subtracts one orthonormal direction at a time; here all C at once, the
  same map in exact arithmetic.
- The number of classes is ``labels.max() + 1``.
- The victim is ue_fast's (``evaluate``'s recipe and crop + flip), not their ResNet-18 with
  rotation, affine, colour jitter and CutMix (p 0.5) for 50 epochs: the defence is the
  projection, and every defence here is measured under one victim recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...ops._checks import check_int
from .base import Defense, _float_option


@dataclass(frozen=True)
class OrthogonalProjection(Defense):
    """Fit a bias-free linear classifier to the training set, then remove from every image its
    components along the classifier's (orthonormalised) class directions. Options: the fit's
    ``epochs`` (None: 20, or more on a small set to reach 980 steps), ``lr`` (0.1) and
    ``batch_size`` (1,024), as the authors'."""

    def fit_epochs(self, n: int) -> int:
        """The epochs of the fit on ``n`` images: ``epochs``, or by default 20, or as many as
        make 980 steps of ``batch_size`` when 20 make fewer."""
        if self.epochs is not None:
            return self.epochs
        return max(self.EPOCHS, math.ceil(self.MIN_STEPS / math.ceil(n / self.batch_size)))

    epochs: int | None = None
    lr: float = 0.1
    batch_size: int = 1024
    name: ClassVar[str] = "op"
    needs_labels: ClassVar[bool] = True
    EPOCHS: ClassVar[int] = 20  # the authors' --epochs
    MIN_STEPS: ClassVar[int] = 980  # their run's SGD steps: 20 epochs x ceil(50,000 / 1,024)

    def __post_init__(self):
        if self.epochs is not None:
            object.__setattr__(self, "epochs", check_int("epochs", self.epochs, 1))
        object.__setattr__(self, "lr", _float_option("lr", self.lr, 0.0, math.inf))
        object.__setattr__(self, "batch_size", check_int("batch_size", self.batch_size, 1))

    def fit(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The linear model's weights W, float32 [C, 3 H W], fitted to uint8 images [N, 3, H, W]
        and labels [N] as the authors' step 1 (see the module docstring)."""
        n, d = len(images), images[0].numel()
        classes = int(labels.max()) + 1
        bound = 1 / math.sqrt(d)  # nn.Linear's default init (kaiming_uniform with a = sqrt(5))
        w = ((torch.rand(classes, d, generator=gen) * 2 - 1) * bound).to(images.device)
        w.requires_grad_(True)
        epochs = self.fit_epochs(n)
        milestones = (int(0.5 * epochs), int(0.75 * epochs))
        flat = images.flatten(1)
        if n * d <= 2**28:  # up to 1 GiB of float32: converted once, not every epoch
            flat = flat.float().div_(255)
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
            for epoch in range(epochs):
                lr = self.lr * 0.1 ** sum(epoch >= m for m in milestones)
                for i in range(0, n, self.batch_size):
                    x = flat[i:i + self.batch_size]
                    x = x if x.is_floating_point() else x.float().div_(255)
                    loss = F.cross_entropy(x @ w.T, labels[i:i + self.batch_size])
                    (grad,) = torch.autograd.grad(loss, w)
                    with torch.no_grad():
                        w -= lr * grad
        return w.detach()

    @staticmethod
    def basis(w: torch.Tensor) -> torch.Tensor:
        """Q, float32 [D, C]: an orthonormal basis of the span of W's rows (normalised first)."""
        rows = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        q, _ = torch.linalg.qr(rows.T.double(), mode="reduced")
        return q.float()

    @staticmethod
    def project(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x - (x Q) Q^T for flattened float images x [N, D]: no component left along Q's columns."""
        return x - (x @ q) @ q.T

    def _prepare(self, images, gen, labels):
        q = self.basis(self.fit(images, labels, gen))
        out = torch.empty_like(images)
        with torch.autocast(images.device.type, enabled=False):
            for i in range(0, len(images), 4096):  # chunks bound the float32 copy
                x = images[i:i + 4096].flatten(1).float().div_(255)
                p = self.project(x, q).mul_(255).round_().clamp_(0, 255)
                out[i:i + 4096] = p.view_as(images[i:i + 4096]).to(torch.uint8)
        return out
