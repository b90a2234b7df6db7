"""Contrastive learners: SimCLR or MoCo v2 pretrained on the (protected) training set without
its labels, then a linear probe on the frozen features. Most unlearnable examples plant a
shortcut tied to the labels; a learner that ignores the labels while it learns its features
may not take it (AUE/AAP, Wang et al. 2024, show most UEs fail against contrastive learners).

As APBench runs them (lafeat/apbench @ 9a6fb91, ``us_train.py``, ``util_us.py``,
``nets/resnet_us.py``):

- the backbone is the victim architecture without its classifier (theirs: a CIFAR ResNet-18's
  512-d pooled features); the projection head Linear(d, 512) -> ReLU -> Linear(512, 128), its
  output L2-normalised (``util_us.py`` L452-473);
- two views per image, each: random resized crop (area 0.2-1, aspect 3/4-4/3), horizontal
  flip, colour jitter (0.4, 0.4, 0.4, 0.1) with probability 0.8, grayscale with probability 0.2
  (``us_train.py`` L31-37), here ``ue_fast.generation.transforms.contrastive_augment`` at
  strength 1 with the crop's smallest area 0.2;
- SimCLR: NT-Xent over the 2 B views at temperature 0.5, scaled by 0.5 / 0.07 (their loss
  keeps SupCon's T / base_T factor), SGD lr 0.5; MoCo v2: a key encoder updated as an
  exponential average (momentum 0.99) before it encodes the second view, a queue of 4,096 keys,
  logits [q k, q queue] / 0.2, cross-entropy scaled by 0.2 / 0.07, SGD lr 0.3 (L209-212,
  ``util_us.py`` L476-570, L625-740);
- SGD with momentum 0.9 and weight decay 1e-4 over the backbone and head, batches of 512
  (whole batches only), the lr on a per-epoch cosine from its value to a thousandth of it
  (``util_us.py`` L743-750);
- the linear probe: Linear(d, C) on the frozen backbone's features of the clean training set,
  SGD at the pretraining lr with momentum 0.9 and no weight decay, batches of 128, 100 epochs;
  test accuracy after every epoch (they report the best).

What differs, and why:

- Batches are reshuffled every epoch; their pretraining loader does not shuffle (no
  ``shuffle=True``), which fixes each batch's negatives for the whole run and looks unintended.
- The probe trains on features computed once, without augmentation (theirs crops and flips
  each probe epoch): 100 probe epochs then cost one forward pass, not 100. Its lr is constant
  (theirs follows the 500-epoch pretraining cosine, so over 100 epochs it falls only to 0.905
  of its start).
- The probe trains on the clean counterparts when they are known (APBench: the clean CIFAR
  training set), else on the training set itself; the results say which.
- The backbone is ue_fast's architecture (``arch``), trained ``epochs`` epochs (theirs: 500).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..generation.transforms import CONTRASTIVE_DRAWS, contrastive_augment
from ..models import build_model
from ..progress import progress as _progress
from .victim import VictimResult

LEARNERS = ("supervised", "simclr", "moco")
BASE_TEMPERATURE = 0.07
BATCH_SIZE, MOMENTUM, WEIGHT_DECAY = 512, 0.9, 1e-4  # pretraining's SGD (us_train.py L132, L216-228)
PROBE_BATCH_SIZE = 128
SETTINGS = {  # APBench's: us_train.py L209-212, util_us.py L476-570
    "simclr": {"lr": 0.5, "temperature": 0.5},
    "moco": {"lr": 0.3, "temperature": 0.2, "queue": 4096, "momentum": 0.99},
}


def settings(kind: str) -> dict:
    """What a results document records of learner ``kind``'s recipe."""
    return {**SETTINGS[kind], "batch_size": BATCH_SIZE, "weight_decay": WEIGHT_DECAY, "momentum": MOMENTUM,
            "probe_batch_size": PROBE_BATCH_SIZE, "probe_augmentation": "none (features computed once)",
            "source": "APBench us_train.py @ 9a6fb91"}


@dataclass
class LearnerResult(VictimResult):
    pretrain_loss: list[float] = field(default_factory=list)  # mean contrastive loss of every epoch


def _head(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))


class _Encoder(nn.Module):
    """backbone features -> projection head -> unit vectors."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = _head(backbone.classifier.in_features)

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)[0]), dim=1)


def _views(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of uint8 images x [B, 3, H, W] as floats in [0, 1]."""
    x = x.float().div_(255)
    return tuple(contrastive_augment(x, torch.rand(len(x), CONTRASTIVE_DRAWS, generator=gen), 1.0, crop_min=0.2)
                 for _ in range(2))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over unit vectors z1, z2 [B, d] (view i of sample b pairs with the other
    view of b; every other of the 2 B - 1 vectors is a negative), times T / 0.07 as APBench's."""
    z = torch.cat([z1, z2])
    b = len(z1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(logits, target) * (temperature / BASE_TEMPERATURE)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's loss: q, k [B, d] unit vectors, queue [d, K]; the positive logit first."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / temperature
    target = torch.zeros(len(q), dtype=torch.int64, device=q.device)
    return F.cross_entropy(logits, target) * (temperature / BASE_TEMPERATURE)


def pretrain(images: torch.Tensor, kind: str, *, arch: str, num_classes: int, epochs: int, seed: int = 0,
             device: str | torch.device = "cpu", batch_size: int = BATCH_SIZE, progress: bool = False,
             label: str | None = None) -> tuple[nn.Module, list[float]]:
    """SimCLR or MoCo v2 on uint8 images [N, 3, H, W], their labels unused: the trained backbone
    (an ``arch`` model whose classifier is left untrained) and each epoch's mean loss."""
    if kind not in SETTINGS:
        raise ValueError(f"unknown contrastive learner {kind!r}; choose one of {', '.join(SETTINGS)}")
    s = SETTINGS[kind]
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    backbone = build_model(arch, num_classes, image_size=max(images.shape[2:]))
    enc = _Encoder(backbone).to(dev)
    params = list(enc.parameters())
    opt = torch.optim.SGD(params, lr=s["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    key_enc, queue = None, None
    if kind == "moco":
        key_enc = copy.deepcopy(enc).requires_grad_(False)
        queue = F.normalize(torch.randn(128, s["queue"], generator=gen), dim=0).to(dev)
        ptr = 0
    xs = images.to(dev)
    n = len(xs)
    bs = min(batch_size, n)
    lr_min = s["lr"] * 0.1 ** 3
    losses = []
    bar = _progress(epochs, f"{kind} pretraining {arch}" + (f" {label}" if label else ""), "epoch",
                    enabled=progress, interval=0)
    for epoch in range(1, epochs + 1):
        for g in opt.param_groups:  # APBench's cosine, epochs counted from 1
            g["lr"] = lr_min + (s["lr"] - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
        enc.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        total = torch.zeros((), dtype=torch.float64, device=dev)  # on the device: no sync per step
        batches = 0
        for i in range(0, n - bs + 1, bs):  # whole batches only
            v1, v2 = _views(xs[perm[i:i + bs]], gen)
            if kind == "simclr":
                loss = nt_xent(enc(v1), enc(v2), s["temperature"])
            else:
                with torch.no_grad():  # the key encoder's average is updated before it encodes
                    for pk, pq in zip(key_enc.parameters(), enc.parameters()):
                        pk.mul_(s["momentum"]).add_(pq.detach(), alpha=1 - s["momentum"])
                    k = key_enc(v2)
                loss = moco_loss(enc(v1), k, queue, s["temperature"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if kind == "moco":  # the keys join the queue, replacing the oldest
                idx = (ptr + torch.arange(len(k), device=dev)) % queue.shape[1]
                queue[:, idx] = k.T
                ptr = int((ptr + len(k)) % queue.shape[1])
            total += loss.detach().double()
            batches += 1
        losses.append(float(total) / max(batches, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
    bar.close()
    return enc.backbone, losses


@torch.no_grad()
def _features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(images[i:i + batch_size].float().div_(255))[0]
                      for i in range(0, len(images), batch_size)])


def linear_probe(backbone: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *, lr: float,
                 epochs: int = 100, seed: int = 0, batch_size: int = PROBE_BATCH_SIZE) -> LearnerResult:
    """Linear(d, C) on the frozen backbone's features: test accuracy after every epoch."""
    dev = next(backbone.parameters()).device
    f_train, f_test = _features(backbone, train_images.to(dev)), _features(backbone, test_images.to(dev))
    y_train, y_test = train_labels.to(dev, torch.int64), test_labels.to(dev, torch.int64)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Linear(f_train.shape[1], num_classes).to(dev)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0)
    result = LearnerResult()
    n = len(f_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)  # on the device: no sync per step
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            logits = probe(f_train[idx])
            loss = F.cross_entropy(logits, y_train[idx])
            if result.initial_loss is None:
                result.initial_loss = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (logits.argmax(1) == y_train[idx]).sum()
            loss_sum += loss.detach().double() * len(idx)
        result.train_acc.append(float(correct) / n)
        result.train_loss.append(float(loss_sum) / n)
        with torch.no_grad():
            result.test_acc.append(float((probe(f_test).argmax(1) == y_test).float().mean()))
    return result


def train_learner(kind: str, train_images: torch.Tensor, probe_images: torch.Tensor, probe_labels: torch.Tensor,
                  test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *, arch: str, epochs: int,
                  probe_epochs: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                  progress: bool = False, label: str | None = None) -> LearnerResult:
    """Pretrain ``kind`` on ``train_images`` (labels unused), then probe linearly on
    ``probe_images``/``probe_labels``; the result's curves are the probe's."""
    from .victim import divergence

    backbone, losses = pretrain(train_images, kind, arch=arch, num_classes=num_classes, epochs=epochs, seed=seed,
                                device=device, progress=progress, label=label)
    result = linear_probe(backbone, probe_images, probe_labels, test_images, test_labels, num_classes,
                          lr=SETTINGS[kind]["lr"], epochs=probe_epochs, seed=seed)
    result.pretrain_loss = losses
    result.diverged = (divergence(result.train_loss, result.initial_loss, num_classes)
                       or (None if all(math.isfinite(v) for v in losses) else
                           {"epoch": next(i for i, v in enumerate(losses, 1) if not math.isfinite(v)),
                            "reason": "the contrastive pretraining loss became non-finite", "rule": "non-finite"}))
    return result
