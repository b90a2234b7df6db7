"""A plain-PyTorch MI-UE outer epoch written the way research code is (the baseline of
bench_generation.py): float32, the pairwise loss through a B x B x D cosine tensor,
images and perturbations on the host and copied per batch, a host sync every step
(the loss is read back for logging), the update as separate tensor ops."""
import torch
import torch.nn.functional as F

from plain_methods import train_on_poisoned


def pairwise_loss(features, labels, t=0.1):
    sim = torch.exp(F.cosine_similarity(features.unsqueeze(1), features.unsqueeze(0), dim=2) / t) + 1e-8
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    return -torch.log(torch.where(same, sim, torch.zeros_like(sim)).sum(1) / sim.sum(1)).mean()


def outer_epoch(model, optimizer, images, labels, poison, *, device, eps, alpha, steps,
                batch_size=128, poison_batch_size=512, gen=None):
    """One outer epoch: a surrogate epoch, then ``steps`` PGD steps on every batch.

    images [N, 3, H, W] float32 and poison (same shape) on the host; poison is updated.
    """
    n = len(images)
    train_on_poisoned(model, optimizer, images, labels, poison, device=device, batch_size=batch_size, gen=gen)
    model.eval()
    model.requires_grad_(False)
    for idx in torch.randperm(n, generator=gen).split(poison_batch_size):
        data, y = images[idx].to(device), labels[idx].to(device)
        delta = torch.nn.Parameter(poison[idx].to(device))
        for _ in range(steps):
            features, _ = model(data + delta)
            loss = pairwise_loss(features, y)
            loss.backward()
            delta.data = delta.data - alpha * delta.grad.sign()
            delta.grad = None
            delta.data = torch.clamp(delta.data, -eps, eps)
            delta.data = torch.clamp(data + delta.data, 0, 1) - data
            loss.item()
        poison[idx] = delta.detach().cpu()
    model.requires_grad_(True)
    return poison
