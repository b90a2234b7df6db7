"""SALM's saliency mask: only the most salient pixels of each image may move.

Saliency of pixel (h, w) of image i is ``sum_c |d CE(f(x_i), y_i) / d x_i[c, h, w]|``
for the surrogate f; the mask keeps the ``percent`` % pixels of largest saliency per
image (all three channels of a kept pixel move).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import widened


def saliency_mask(forward, x: torch.Tensor, labels: torch.Tensor, percent: float) -> torch.Tensor:
    """bool [B, 1, H, W] of the ``percent`` % most salient pixels of each image x [B, 3, H, W] in [0, 1]."""
    if not (0 < percent <= 100):
        raise ValueError(f"percent must be in (0, 100], got {percent!r}")
    b, _, h, w = x.shape
    k = max(1, round(percent / 100 * h * w))
    x = x.detach().requires_grad_(True)
    _, logits = forward(x)
    loss = F.cross_entropy(widened(logits), labels, reduction="sum")  # sum: per-sample gradients unscaled
    (grad,) = torch.autograd.grad(loss, x)
    sal = widened(grad).abs().sum(1).flatten(1)  # [B, H*W]
    top = sal.topk(k, dim=1).indices
    mask = torch.zeros_like(sal, dtype=torch.bool).scatter_(1, top, True)
    return mask.view(b, 1, h, w)


def dataset_saliency(surrogate, data, percent: float, batch_size: int) -> torch.Tensor:
    """The mask of every image of ``data`` (a ``Batches``), bool [N, 1, H, W] on its place
    (under torchrun, of this process's shard: each image's mask is its own)."""
    with surrogate.frozen():
        masks = []
        for idx in data.ordered(batch_size):
            with surrogate.ctx.autocast():
                masks.append(saliency_mask(surrogate.forward, data.clean(idx), data.labels[idx], percent))
    return torch.cat(masks).to(data.place)
