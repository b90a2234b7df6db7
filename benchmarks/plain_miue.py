"""A plain-PyTorch MI-UE outer epoch written the way research code is (the baseline of
bench_generation.py and bench_dropin.py): float32, the pairwise loss through a B x B x D
cosine tensor, images and perturbations on the host and copied per batch, a host sync
every step (the loss is read back for logging), the update as separate tensor ops.

``authors_l2sim`` and ``authors_loss`` follow the MI-UE authors' documented loss
(hala64/mi-ue, utils.py ``nt_xent`` and ``l2sim``, gen_miue.py ``nt_xent_l2`` with its
default ``zeta = 0``): the l2 term still costs its B x B x D difference tensor and a
Python loop over the batch, although its weight is zero.
"""
import numpy as np
import torch
import torch.nn.functional as F

from plain_methods import train_on_poisoned


def pairwise_loss(features, labels, t=0.1):
    sim = torch.exp(F.cosine_similarity(features.unsqueeze(1), features.unsqueeze(0), dim=2) / t) + 1e-8
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    return -torch.log(torch.where(same, sim, torch.zeros_like(sim)).sum(1) / sim.sum(1)).mean()


def authors_l2sim(features, labels):
    """mean_i log(1 + sum_{j of i's class} ||f_i - f_j|| / D), through a B x B x D difference
    tensor and a loop over i with a host copy of the labels, as the authors compute it."""
    d = features.shape[1]
    y = labels.cpu().numpy()
    norms = torch.linalg.norm(features[:, None, :] - features, dim=2)
    terms = [torch.log(1 + norms[i, np.nonzero(y == y[i])[0].tolist()].sum() / d) for i in range(len(features))]
    return sum(terms) / len(terms)


def authors_loss(features, labels, t=0.1, zeta=0.0):
    """``nt_xent(features, labels, t) + zeta * l2sim(features, labels)``: the authors' nt_xent_l2."""
    return pairwise_loss(features, labels, t) + zeta * authors_l2sim(features, labels)


def authors_update(delta, data, eps, alpha):
    """The authors' four lines after ``loss.backward()`` (gen_miue.py): the sign step, the reset
    of the gradient, the L-inf clamp and the pixel-range clamp, each a pass of its own."""
    delta.data = delta.data - alpha * delta.grad.sign()
    delta.grad = None
    delta.data = torch.clamp(delta.data, -eps, eps)
    delta.data = torch.clamp(data + delta.data, 0, 1) - data


def outer_epoch(model, optimizer, images, labels, poison, *, device, eps, alpha, steps,
                batch_size=128, poison_batch_size=512, gen=None, loss_fn=None, update=None):
    """One outer epoch: a surrogate epoch, then ``steps`` PGD steps on every batch.

    images [N, 3, H, W] float32 and poison (same shape) on the host; poison is updated.
    loss_fn(features, labels) (default: the B x B x D cosine formulation) and
    update(delta, data, eps, alpha) (default: :func:`authors_update`) can be swapped for
    other implementations of the same step.
    """
    loss_fn = loss_fn or pairwise_loss
    update = update or authors_update
    n = len(images)
    train_on_poisoned(model, optimizer, images, labels, poison, device=device, batch_size=batch_size, gen=gen)
    model.eval()
    model.requires_grad_(False)
    for idx in torch.randperm(n, generator=gen).split(poison_batch_size):
        data, y = images[idx].to(device), labels[idx].to(device)
        delta = torch.nn.Parameter(poison[idx].to(device))
        for _ in range(steps):
            features, _ = model(data + delta)
            loss = loss_fn(features, y)
            loss.backward()
            update(delta, data, eps, alpha)
            loss.item()
        poison[idx] = delta.detach().cpu()
    model.requires_grad_(True)
    return poison
