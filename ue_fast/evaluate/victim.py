"""Train a victim network on (protected) images and test it on clean ones.

The standard recipe of the unlearnable-examples literature: SGD (lr 0.1, momentum
0.9, weight decay 5e-4), cosine schedule over the epochs, batch 128, random crop
with 4-pixel zero padding and horizontal flip; the transformers (``vit-small``,
``cait-small``) train with AdamW instead (lr 1e-3, weight decay 0.05: their
``ue_fast.models.RECIPES``), with the same schedule and augmentation. The images stay on the device as
uint8 and the augmentation is vectorised there. A defence (``ue_fast.evaluate.defenses``)
may transform the training set once (JPEG, grayscale) and/or replace the batch
loss (cutout, cutmix, mixup, adversarial training, UEraser). On CUDA the victim
trains under bf16 autocast in channels-last, as the generators do.

A victim that diverges (a learning rate far too high, ``lr=1e6``) ends at about chance
accuracy, which reads exactly like a perfect protection. :func:`divergence` states the rule
that tells the two apart from the training loss; ``train_victim`` applies it, records the
verdict in ``VictimResult.diverged`` and warns (:class:`DivergenceWarning`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models import build_model, make_optimizer, recipe
from ..progress import progress as _progress


# A victim has diverged when its last epoch's mean training loss exceeds GROWTH times the
# larger of its loss at initialisation and ln(C) (what a uniform guess scores); see divergence().
GROWTH = 10.0


class DivergenceWarning(UserWarning):
    """A victim's training diverged: its accuracy measures a broken network, not the data."""


@dataclass
class VictimResult:
    test_acc: list[float] = field(default_factory=list)  # after every epoch
    train_acc: list[float] = field(default_factory=list)
    model: torch.nn.Module | None = None  # the trained victim, when asked for
    train_loss: list[float] = field(default_factory=list)  # mean training loss of every epoch
    initial_loss: float | None = None  # the loss of the first batch, before any update
    diverged: dict | None = None  # divergence()'s verdict: None, or when and why

    @property
    def best(self) -> float:
        """The peak test accuracy over the epochs (``evaluate``'s ``peak_accuracy``)."""
        return max(self.test_acc)

    @property
    def peak_epoch(self) -> int:
        """The first epoch (1-based) at which the test accuracy reached its peak."""
        return self.test_acc.index(self.best) + 1

    @property
    def last(self) -> float:
        return self.test_acc[-1]


def divergence(train_loss: list[float], initial_loss: float | None, num_classes: int) -> dict | None:
    """Whether a victim with these per-epoch mean training losses diverged: None, or
    ``{"epoch", "reason", "rule", "initial_loss", "last_loss", "threshold"}`` (``epoch`` 1-based).

    The rule, two cases:

    - a non-finite loss (NaN or infinite) in any epoch: the weights are then NaN or infinite,
      and every later prediction is meaningless; ``epoch`` is the first such epoch;
    - the last epoch's mean training loss above ``GROWTH`` (10) times ``max(initial_loss, ln C)``:
      ``initial_loss`` is the first batch's loss before any update (about ln C at initialisation
      for any defence's loss; unlike the first epoch's mean, a loss that explodes during the first
      epoch cannot inflate it) and ln C is what a uniform guess over C classes scores. Ending an order of magnitude above both, training has made the network
      far worse on its own training data than untrained or guessing: its weights blew up.
      ``epoch`` is the first epoch whose mean loss exceeded the threshold; a loss that rises
      within a run but ends below it is not divergence (the run recovered).

    Why 10 and not 2: the first steps at the recipe's learning rate often spike the loss to a few
    times ln C before it falls (UEraser's max-loss phase too), and a run of one or two epochs
    ends on that spike; a blown-up network's loss is orders of magnitude higher (``lr=1e6``:
    1e11). Not flagged: a victim that merely fails to learn (loss near ln C, chance accuracy),
    which is what a protection does too; only a clean reference (``evaluate(reference=True)``)
    tells those apart.
    """
    if not train_loss:
        return None
    ref = max(initial_loss if initial_loss is not None and math.isfinite(initial_loss) else 0.0,
              math.log(max(num_classes, 2)))
    threshold = GROWTH * ref
    rule = (f"diverged: a non-finite training loss, or a last epoch's mean training loss above {GROWTH:g} x "
            "max(the first batch's loss, ln C)")
    doc = {"rule": rule, "initial_loss": initial_loss, "last_loss": train_loss[-1], "threshold": threshold}
    bad = [e for e, v in enumerate(train_loss) if not math.isfinite(v)]
    if bad:
        return {"epoch": bad[0] + 1, "reason": f"the training loss became {train_loss[bad[0]]} in epoch {bad[0] + 1}",
                **doc}
    if train_loss[-1] > threshold:
        first = next(e for e, v in enumerate(train_loss) if v > threshold)
        start = initial_loss if initial_loss is not None else float("nan")
        return {"epoch": first + 1,
                "reason": f"the mean training loss rose to {train_loss[-1]:.4g} by the last epoch, above "
                          f"{threshold:.4g} ({GROWTH:g} x max(initial loss {start:.4g}, ln {num_classes})); it first "
                          f"exceeded that in epoch {first + 1}", **doc}
    return None


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels, and random horizontal flip, per sample.

    x: [B, C, H, W] -> [B, C, H, W]. Randomness from ``gen`` (a CPU generator).
    """
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = ox[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on uint8 images [N, 3, H, W]."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().div_(255)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        _, logits = model(x)
        correct += (logits.argmax(1) == labels[i:i + batch_size]).sum()
    return float(correct) / len(images)


def train_victim(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, *, arch: str = "resnet18", epochs: int = 15,
                 batch_size: int = 128, lr: float | None = None, weight_decay: float | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = False, defense=None,
                 amp: bool | None = None, return_model: bool = False, on_epoch=None,
                 label: str | None = None) -> VictimResult:
    """Train ``arch`` on uint8 train images [N, 3, H, W]; test accuracy on clean test images after each epoch.

    defense: None, a name of ``ue_fast.evaluate.defenses.DEFENSES`` or a ``Defense``; its
    ``prepare`` runs once on the training images, its ``loss`` on every batch.
    lr, weight_decay: the peak learning rate and the weight decay (default: ``arch``'s recipe,
    ``ue_fast.models.RECIPES``: 0.1 and 5e-4 with SGD, 1e-3 and 0.05 with AdamW for the transformers).
    amp: bf16 autocast (default: on CUDA). return_model: keep the trained model in
    ``result.model`` (for feature statistics). on_epoch: called as ``on_epoch(epoch, model)`` after
    every epoch's test (the UD metric measures the model there); it must leave the model as it found it.
    label: what the victim trains on, shown in its progress bar ("on the clean demo images").

    Records every epoch's mean training loss and the first batch's loss, and judges divergence
    with :func:`divergence` (``result.diverged``): a :class:`DivergenceWarning` as soon as a loss is
    non-finite (training goes on, so that every curve has ``epochs`` points: stop it if you like),
    or at the end when the loss ended far above where it started.
    """
    from .defenses import get_defense

    if defense is None or isinstance(defense, str):
        defense = get_defense(defense or "none")
    dev = torch.device(device)
    amp = dev.type == "cuda" if amp is None else amp
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(arch, num_classes, image_size=max(train_images.shape[2:])).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = recipe(arch)["lr"] if lr is None else lr
    opt = make_optimizer(model.parameters(), arch, lr=lr, weight_decay=weight_decay)
    ys = train_labels.to(dev, torch.int64)
    xs = defense.prepare(train_images.to(dev), gen, ys)
    xt, yt = test_images.to(dev), test_labels.to(dev, torch.int64)
    n = len(xs)
    result = VictimResult()
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    bar = _progress(epochs, f"victim {arch} ({defense.name})" + (f" {label}" if label else ""), "epoch",
                    enabled=progress, interval=0)
    name = f"victim {arch} ({defense.name}, lr {lr:g})"
    first_loss = None
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        model.train()
        phase = defense.at_epoch(epoch)  # UEraser's max-loss phase ends after its epochs
        perm = torch.randperm(n, generator=gen).to(dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # on the device: no sync per batch
        seen = 0
        for i in range(0, n - 1 if n % batch_size == 1 else n, batch_size):  # no batch of one for BN
            idx = perm[i:i + batch_size]
            x = crop_flip(xs[idx].float().div_(255), gen)
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss, logits = phase.loss(model, x, ys[idx], gen)
            if first_loss is None:
                first_loss = loss.detach().double().clone()
            loss_sum += loss.detach().double() * len(idx)
            seen += len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (logits.argmax(1) == ys[idx]).sum()
        result.train_acc.append(float(correct) / n)
        result.train_loss.append(float(loss_sum) / max(seen, 1))
        if result.initial_loss is None and first_loss is not None:
            result.initial_loss = float(first_loss)
        if result.diverged is None and not math.isfinite(result.train_loss[-1]):
            result.diverged = divergence(result.train_loss, result.initial_loss, num_classes)
            _warn_diverged(name, result.diverged)
        with autocast():
            result.test_acc.append(accuracy(model, xt, yt))
        if on_epoch is not None:
            on_epoch(epoch, model)
        bar.set_postfix(train_acc=f"{result.train_acc[-1]:.3f}", test_acc=f"{result.test_acc[-1]:.3f}")
        bar.update(1)
    bar.close()
    if result.diverged is None:
        result.diverged = divergence(result.train_loss, result.initial_loss, num_classes)
        if result.diverged is not None:
            _warn_diverged(name, result.diverged)
    if return_model:
        result.model = model
    return result


def _warn_diverged(name: str, verdict: dict) -> None:
    warnings.warn(f"{name} diverged at epoch {verdict['epoch']}: {verdict['reason']}. Its test accuracy measures a "
                  "broken network, not the training data (chance accuracy here is no protection): lower the "
                  "learning rate", DivergenceWarning, stacklevel=3)
