"""The unlearnable distance (UD) of "How Far Are We from True Unlearnability?" (Ye, Su, Qian, 2024).

Follows the authors' code (MLsecurityLab/HowFarAreFromTrueUnlearnability @ ea9a4a6):
``poison_train_sharp.py`` ``layer_sharpness`` (the per-layer measure, computed after
every epoch of the victim's training) and ``analysis/get_ud.py`` (``get_threshold``
and the counting that follows it).

**Sharpness-aware learnability** (SAL) of one layer of a model: only that layer's
weight W (every ``nn.Conv2d`` and ``nn.Linear`` weight is a layer; biases and norms
are not) moves, from the checkpoint's W0, in eval mode. ``iters`` rounds of: one SGD
pass of descent on the cross-entropy over the data (step ``lr`` per batch), then the
change projected into the relative ball ``|W - W0| <= rho |W0|`` (Frobenius norms);
the same with ascent on a second copy; then the loss of both copies over the data.
SAL is the largest loss change reached either way:
``max(max_loss - origin_loss, origin_loss - min_loss)``, the extremes taken over the
rounds. A layer whose loss can still move is a layer that can still learn.

**UD**: SAL per layer after every epoch, for the victim on the protected data and for
a victim trained on the clean data. The threshold is, per epoch, the midpoint of the
two centres of a 2-means clustering of the clean run's layer values, averaged over
the epochs. A (layer, epoch) is learnable when its SAL exceeds it. UD = (learnable
layers per epoch on the protected data) / (the same on clean data): 1 for clean data,
smaller the less can be learnt.

Made fast (the authors' loop costs ``layers x iters x 4`` passes over the whole
training set after every epoch, hundreds of times the epoch itself):

- a layer's descent and ascent copies run as one batched model over stacked weight
  changes (``torch.func.functional_call`` under ``vmap``), one pass of the data for
  both; ``group`` > 2 batches the copies of several layers together (wider kernels for
  a GPU, at the price of weight gradients computed for every layer of the group in
  every copy). :func:`layer_sharpness_reference` is the one-copy-at-a-time loop of the
  definition, and the tests hold the two equal;
- the data are a class-balanced, seeded subset of ``samples`` images (the figure's
  sensitivity to it is measured; see docs/ud.md), the same subset every epoch.

Differences from the authors' code, and why:

- The baseline loss is the checkpoint's own loss, in eval mode on the evaluation data;
  the authors compare against the running training loss of the epoch (train mode,
  weights changing), which can inflate SAL where the two differ.
- Every evaluation (the baseline's and each round's) is on one fixed draw of the
  augmented data; the authors draw a fresh augmentation each pass, so their loss
  changes include augmentation noise.
- The 2-means is solved exactly (the best split of the sorted values); the authors
  call scikit-learn's ``KMeans(n_clusters=2, random_state=0)``, which finds the same
  split on well-separated values.
- All copies of a pass see the same batches (the authors' layers each shuffle anew).
"""
from __future__ import annotations

import copy
import hashlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .victim import crop_flip

RHO, ITERS, LR, BATCH_SIZE, SAMPLES = 0.05, 10, 0.1, 256, 2048  # the authors' rho, rounds, step, batch


def sharpness_layers(model: nn.Module) -> list[str]:
    """Names of the parameters SAL moves: the weight of every ``nn.Conv2d`` and ``nn.Linear``, in module order."""
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def subset(labels: torch.Tensor, samples: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced, seeded subset of about ``samples`` images (all of them when None or more)."""
    n = len(labels)
    if samples is None or samples >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per = max(1, samples // len(classes))
    picks = []
    for c in classes.tolist():
        idx = torch.nonzero(labels == c)[:, 0]
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per]])
    return torch.sort(torch.cat(picks)).values


def _seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def _stream(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, key: str, augment: bool,
            device: torch.device):
    """The batches of one pass: shuffled, whole batches only (a partial last one is dropped, as the authors'
    ``drop_last``; one batch of everything when there are fewer images than a batch), crop + flip when
    ``augment``. Deterministic in (seed, key): the same pass for every implementation."""
    gen = torch.Generator().manual_seed(_seed(seed, key))
    n = len(images)
    perm = torch.randperm(n, generator=gen)
    size = min(batch_size, n)
    for i in range(0, n - size + 1, size):
        idx = perm[i:i + size]
        x = images[idx].to(device).float().div_(255)
        if augment:
            x = crop_flip(x, gen)
        yield x, labels[idx].to(device, torch.int64)


def _project_(delta: torch.Tensor, w0_norm: torch.Tensor, rho: float) -> None:
    """delta [..] in place into the ball |delta| <= rho * |W0|."""
    norm = delta.norm()
    if norm > rho * w0_norm:
        delta.mul_(rho * w0_norm / norm)


@torch.no_grad()
def _mean_loss(model, stream) -> float:
    total, n = 0.0, 0
    for x, y in stream:
        total += float(F.cross_entropy(model(x)[1], y, reduction="sum"))
        n += len(y)
    return total / n


def layer_sharpness_reference(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                              layers: list[str] | None = None, *, rho: float = RHO, iters: int = ITERS,
                              lr: float = LR, batch_size: int = BATCH_SIZE, seed: int = 0,
                              augment: bool = True) -> torch.Tensor:
    """SAL of each layer, one layer and one copy at a time, as the definition reads (the test
    reference of :func:`layer_sharpness`, and its slow path). images: uint8 [N, 3, H, W].
    Returns float64 [len(layers)]."""
    device = next(model.parameters()).device
    layers = sharpness_layers(model) if layers is None else layers
    base = copy.deepcopy(model).eval()
    evaluation = lambda: _stream(images, labels, batch_size, seed, "eval", augment, device)  # noqa: E731
    origin = _mean_loss(base, evaluation())
    out = []
    for name in layers:
        w0 = base.get_parameter(name).detach().clone()
        copies = {}
        for sign in (1, -1):  # descent, ascent
            m = copy.deepcopy(base).eval()
            m.requires_grad_(False)
            m.get_parameter(name).requires_grad_(True)
            copies[sign] = m
        lo = hi = origin
        for it in range(iters):
            for sign, m in copies.items():
                w = m.get_parameter(name)
                for x, y in _stream(images, labels, batch_size, seed, f"train{it}", augment, device):
                    (g,) = torch.autograd.grad(F.cross_entropy(m(x)[1], y), [w])
                    with torch.no_grad():
                        w.sub_(sign * lr * g)
                with torch.no_grad():
                    delta = w - w0
                    _project_(delta, w0.norm(), rho)
                    w.copy_(w0 + delta)
            lo = min(lo, _mean_loss(copies[1], evaluation()))
            hi = max(hi, _mean_loss(copies[-1], evaluation()))
        out.append(max(hi - origin, origin - lo))
    return torch.tensor(out, dtype=torch.float64)


def layer_sharpness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layers: list[str] | None = None,
                    *, rho: float = RHO, iters: int = ITERS, lr: float = LR, batch_size: int = BATCH_SIZE,
                    seed: int = 0, augment: bool = True, group: int | None = None) -> torch.Tensor:
    """SAL of each layer (see the module docstring), every layer's descent and ascent copy at once.

    model: a ``ue_fast.models`` network (left unchanged). images: uint8 [N, 3, H, W] on any device,
    labels [N]; batches go to the model's device. group: copies per batched model (default 2: a
    layer's descent and ascent copies; up to 2 x len(layers); the memory grows with group x batch_size
    activations).
    Returns float64 [len(layers)], equal to :func:`layer_sharpness_reference` up to float rounding.
    """
    from torch.func import functional_call, vmap

    if not (0 < rho) or iters < 1 or not (lr > 0):
        raise ValueError(f"need rho > 0, iters >= 1, lr > 0; got rho={rho!r}, iters={iters!r}, lr={lr!r}")
    device = next(model.parameters()).device
    layers = sharpness_layers(model) if layers is None else list(layers)
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    unknown = [n for n in layers if n not in params]
    if unknown:
        raise ValueError(f"not parameters of the model: {unknown}")
    copies = [(name, sign) for name in layers for sign in (1, -1)]  # (layer, +1 descent / -1 ascent)
    group = 2 if group is None else max(1, int(group))

    def logits_of(deltas: dict, x: torch.Tensor) -> torch.Tensor:
        p = dict(params)
        for n, d in deltas.items():
            p[n] = params[n] + d
        return functional_call(model, (p, buffers), (x,))[1]

    batched = vmap(logits_of, in_dims=(0, None))

    def losses(deltas: dict, x, y) -> torch.Tensor:  # [k] mean cross-entropy of each copy
        out = batched(deltas, x)  # [k, B, C]
        k, b = out.shape[:2]
        return F.cross_entropy(out.flatten(0, 1), y.repeat(k), reduction="none").view(k, b).mean(1)

    try:
        with torch.no_grad():
            origin = _mean_loss(model, _stream(images, labels, batch_size, seed, "eval", augment, device))
        lo = {name: origin for name in layers}
        hi = {name: origin for name in layers}
        for start in range(0, len(copies), group):
            chunk = copies[start:start + group]
            k = len(chunk)
            names = sorted({n for n, _ in chunk}, key=layers.index)
            # per layer of the chunk: a stacked change [k, *W.shape], non-zero only in that layer's own copies
            deltas = {n: torch.zeros((k, *params[n].shape), device=device, dtype=params[n].dtype) for n in names}
            own = {n: torch.tensor([c[0] == n for c in chunk], device=device) for n in names}
            signs = torch.tensor([float(c[1]) for c in chunk], device=device)
            w0_norm = {n: params[n].norm() for n in names}
            for it in range(iters):
                for x, y in _stream(images, labels, batch_size, seed, f"train{it}", augment, device):
                    for d in deltas.values():
                        d.requires_grad_(True)
                    grads = torch.autograd.grad((signs * losses(deltas, x, y)).sum(), list(deltas.values()))
                    with torch.no_grad():
                        for (n, d), g in zip(deltas.items(), grads):
                            mask = own[n].view(-1, *([1] * (d.dim() - 1))).to(d.dtype)
                            deltas[n] = (d - lr * g * mask).detach()
                with torch.no_grad():
                    for j, (n, _) in enumerate(chunk):  # each copy back into its ball, once per pass
                        _project_(deltas[n][j], w0_norm[n], rho)
                    total = torch.zeros(k, dtype=torch.float64, device=device)
                    seen = 0
                    for x, y in _stream(images, labels, batch_size, seed, "eval", augment, device):
                        total += losses(deltas, x, y).double() * len(y)
                        seen += len(y)
                    mean = (total / seen).tolist()
                for j, (n, sign) in enumerate(chunk):
                    if sign == 1:
                        lo[n] = min(lo[n], mean[j])
                    else:
                        hi[n] = max(hi[n], mean[j])
    finally:
        model.train(was_training)
    return torch.tensor([max(hi[n] - origin, origin - lo[n]) for n in layers], dtype=torch.float64)


def two_means_midpoint(values) -> float:
    """The midpoint of the two centres of the optimal 2-means clustering of 1-D ``values`` (the best
    split of the sorted values by within-cluster sum of squares); the value itself when all are equal."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten().sort().values
    n = len(v)
    if n == 0:
        raise ValueError("two_means_midpoint needs at least one value")
    if n == 1 or v[0] == v[-1]:
        return float(v[0])
    c1, c2 = torch.cumsum(v, 0), torch.cumsum(v * v, 0)
    k = torch.arange(1, n, dtype=torch.float64)  # left sizes 1..n-1
    left_sum, left_sq = c1[:-1], c2[:-1]
    right_sum, right_sq = c1[-1] - left_sum, c2[-1] - left_sq
    sse = (left_sq - left_sum ** 2 / k) + (right_sq - right_sum ** 2 / (n - k))
    i = int(torch.argmin(sse))
    return float((left_sum[i] / k[i] + right_sum[i] / (n - k[i])) / 2)


def unlearnable_distance(protected: torch.Tensor, clean: torch.Tensor) -> dict:
    """UD from per-epoch SAL arrays [epochs, layers] of the protected and the clean run.

    Returns threshold (the mean over the clean epochs of the 2-means midpoint across layers),
    the learnable layers per epoch of each run, and ``ud`` = protected / clean (None, with a
    warning, when no clean layer is learnable)."""
    protected = torch.as_tensor(protected, dtype=torch.float64)
    clean = torch.as_tensor(clean, dtype=torch.float64)
    if protected.dim() != 2 or clean.dim() != 2 or protected.shape[1] != clean.shape[1]:
        raise ValueError(f"need [epochs, layers] arrays with the same layers, got {tuple(protected.shape)} and "
                         f"{tuple(clean.shape)}")
    threshold = sum(two_means_midpoint(row) for row in clean) / len(clean)
    count = lambda s: float((s > threshold).sum()) / len(s)  # noqa: E731
    c, p = count(clean), count(protected)
    if c == 0:
        warnings.warn("no layer of the clean run is above the UD threshold: UD is undefined", RuntimeWarning)
    return {"ud": p / c if c else None, "threshold": threshold, "learnable_per_epoch": {"protected": p, "clean": c},
            "num_layers": int(clean.shape[1])}


def check_settings(rho, iters, samples, lr) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < math.inf:
        raise ValueError(f"ud_rho must be a positive number (a relative radius: 0.05), got {rho!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"ud_iters must be a positive integer, got {iters!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 2):
        raise ValueError(f"ud_samples must be an integer >= 2 or None (all), got {samples!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"ud_lr must be a positive number, got {lr!r}")
