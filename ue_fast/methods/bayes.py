r"""Bayes-error unlearnable examples (Zhang, Sun, Lim, Zhang, AAAI 2026, arXiv:2511.08191).

"Towards Provably Unlearnable Examples via Bayes Error Optimisation": perturb the images
so that a kernel estimate of the Bayes error of their features is as large as possible.

The estimator (leave-one-out Gaussian-kernel class posterior). For features ``f`` [B, D]
with labels ``y`` [B] and bandwidth ``sigma``:

    l_ij   = -|f_i - f_j|^2 / (2 sigma^2)                (j != i; l_ii = -inf)
    w_ij   = exp(l_ij) / sum_{k != i} exp(l_ik)           (leave-one-out kernel weights)
    p_ic   = sum_{j: y_j = c} w_ij                        (class posterior of sample i)
    E      = (1/B) sum_i (1 - max_c p_ic)                 (Bayes error estimate)

Gradient, with ``c_i = argmax_c p_ic`` held fixed (the subgradient of the max; ties go to
the first class) and ``G_ij = -(1/B) w_ij ([y_j = c_i] - p_{i c_i})`` (0 on the diagonal):

    dE/dl_ij = G_ij,    dE/df_k = -(1/sigma^2) [ f_k (sum_j S_kj) - sum_j S_kj f_j ],
    S = G + G^T.

Computation: ``|f_i - f_j|^2 = |f_i|^2 + |f_j|^2 - 2 f_i.f_j`` from a matmul on features
centred by their batch mean (distances are translation invariant; centring shrinks the
cancellation error), clamped at 0; row blocks of ``[chunk, B]`` with the row maximum
subtracted before ``exp`` (so a sample whose neighbours are all far away still has a
finite, nearest-neighbour-like posterior instead of 0/0); the gradient is accumulated
during the forward pass. Memory O(chunk * B + B * D); no [B, B, D] tensor.

The authors' estimator (github.com/cat-claws/bayes-error-local-averaging, used by
github.com/cat-claws/unlearnable) is this one with ``sigma = 0.3`` on penultimate features
divided by their largest absolute entry (``feature_scale="max"``), and ``+1e-8`` in the
denominator (dropped here: it turns far-apart samples into posterior 0 and gradient 0).

The generator. The authors alternate retraining a ResNet-18 from scratch on the current
perturbed set (30 epochs, SGD lr 0.1 cosine, no augmentation) with one ascent step (AdamW,
lr 1e-3) on the whole set's Bayes error, projected to eps 8/255. Here it runs on the shared
bi-level engine like MI-UE: per round the surrogate trains one epoch on ``x + delta``, then
``pgd_steps`` sign-ascent steps (``maximize``) per shuffled batch of ``poison_batch_size``
on the batch's estimate E. Defaults: eps 8/255, sigma 0.3, max scaling (authors'); 100
rounds x 10 steps of 0.5/255, batch 512 (this project's bi-level schedule; a round moves a
pixel by up to 5/255, above the 1/255 resolution of the int8 perturbation store). The
estimate is then per batch, not per data set: a batch of 512 holds ~51 samples per
CIFAR-10 class. Options:

- ``pretrain_epochs``: clean epochs first (the authors' first surrogate is trained on clean
  data); ``train_surrogate=False``: a frozen surrogate, as in AP.
- ``retrain_epochs=K``: every round starts from a fresh surrogate (new weights, seeded by
  the seed and the round) trained K epochs on ``x + delta`` (lr cosine from ``lr`` to 0).
- ``whole_set=True``: every step takes one estimate over all N samples. The features of
  the whole set are computed batch by batch without a graph, E and dE/df come from them,
  and the gradient is back-propagated batch by batch (``poison_batch_size`` then only
  bounds memory); the steps equal those of a single batch holding the whole set.
- The authors' schedule is ``retrain_epochs=30, whole_set=True, pgd_steps=1`` with
  ``epochs`` the number of ascent steps (sign steps of ``alpha`` instead of AdamW's).
- ``sigma=None`` takes the median heuristic per estimate (over at most 4,096 samples) and
  ``feature_scale="l2"`` unit-normalises the features instead.

Measured on CPU (cnn-small surrogate and 15-epoch victim, 1,000 demo images, test on the
200 demo test images, victim seeds 0 / 1; clean 0.420 / 0.460): 5 rounds x 4 steps of 1/255
from scratch 0.425 / 0.400; 5 clean epochs then 10 frozen steps of 1/255 0.400 / 0.375,
with ``sigma=None, feature_scale="l2"`` 0.365 / 0.390. Mixed (500 clean + the other 500
protected, the last config) vs the clean 500 alone: 0.445 vs 0.315 (seed 0), 0.395 vs
0.420 (seed 1), i.e. within victim noise: the paper's mixed-data property (CIFAR-10 50/50:
69.68% vs 91.16% clean-only, full schedule on ResNet-18) is not reproduced at this scale.
With a 30-epoch victim (clean 0.455, seed 0): 5 clean epochs then 10 frozen steps of 1/255,
median/l2 0.41, 20 steps 0.425, 20 steps with sigma 0.3 and max scaling 0.44; 10 rounds x 5 steps
of 1/255 from scratch 0.41 (max scaling) and 0.44 (median/l2). The frozen surrogate's batch
estimate E does rise under the ascent (0.56 to 0.82 over 20 steps; 0.9 is the maximum for 10
classes), but the effect does not transfer to the victim at this scale. On 5,000 CIFAR-10
images (5 clean epochs, 20 frozen steps of 1/255, sigma 0.3; 20-epoch victim, 1,000 test
images): 0.57 against clean 0.625, a small effect.

The mixed-data property at CPU scale (2026-11-24; 1,000 CIFAR-10 training images, 100 per
class, 1,000 test images; cnn-small, 30-epoch victim, seed 0): clean 0.505, the clean half
alone 0.392. Victims on all-protected data / on the clean half plus the protected half:
a surrogate pre-trained 30 clean epochs, then 20 frozen steps of 1/255 on the whole-set
estimate, 0.444 / 0.461; the same at eps 16/255 (steps of 2/255) 0.380 / 0.471; the
authors' schedule (8 rounds of a fresh surrogate trained 30 epochs, then one whole-set
step of 1/255; ``benchmarks/results/reproduce-small-cpu-2026-11-24-bayes-authors-mixed.md``)
0.439 / 0.470. For comparison TAP against the same 30-epoch surrogate (20 steps): 0.408 /
0.472, and at eps 16/255 0.216 / 0.418. No method, and no budget up to
16/255, makes the mixed victim worse than the clean half at this scale: 500 extra images,
perturbed or not, are worth more to a victim trained on 500 than the perturbation costs.
The paper's claim (CIFAR-10, ResNet-18, 25,000 + 25,000) needs a GPU to check; the command
is in ``benchmarks/reproduce.py`` (``--mixed 0.5`` with the authors' schedule by ``--set``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..ops._checks import check_features, check_labels, check_num_classes, check_real
from .base import GeneratorConfig, Method, int_setting, real_setting

# Rows per block: a [chunk, B] block stays around 16 M elements (64 MB in float32).
_CHUNK_ELEMS = 1 << 24
FEATURE_SCALES = ("max", "l2", "none")


def _check(features, labels, num_classes, sigma):
    check_features(features)
    num_classes = check_num_classes(num_classes)
    check_labels(labels, features, num_classes)
    sigma = check_real("sigma", sigma, positive=True)
    if features.shape[0] < 2:
        raise ValueError(f"a leave-one-out estimate needs a batch of at least 2, got {features.shape[0]}")
    return num_classes, sigma


def _blocks(features, labels, num_classes, sigma):
    """Yield (lo, hi, f [B, D] centred, w [c, B], p [c, C]) per row block of rows lo:hi.

    Float32 (float64 for float64 input).
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.to(dtype)
    f = f - f.mean(0, keepdim=True).detach()
    sq = (f * f).sum(1)  # [B]
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)  # [B, C]
    b = f.shape[0]
    chunk = max(1, min(b, _CHUNK_ELEMS // b))
    for lo in range(0, b, chunk):
        hi = min(lo + chunk, b)
        d = (sq[lo:hi, None] + sq[None, :] - 2 * (f[lo:hi] @ f.T)).clamp_min(0)  # [c, B]
        rows = torch.arange(hi - lo, device=f.device)
        logit = (-0.5 / sigma ** 2) * d
        logit = logit.index_put((rows, rows + lo), torch.tensor(-math.inf, dtype=dtype, device=f.device))
        w = torch.softmax(logit, dim=1)  # max-subtracted; the diagonal is exactly 0
        yield lo, hi, f, w, w @ onehot


def loo_kernel_posterior(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         sigma: float) -> torch.Tensor:
    """Leave-one-out Gaussian-kernel class posteriors p [B, C] of ``features`` [B, D] (B >= 2).

    ``p_ic`` as in this module's docstring; differentiable by autograd (which keeps the
    [B, B] weights). Float64 for float64 features, float32 otherwise.
    """
    num_classes, sigma = _check(features, labels, num_classes, sigma)
    return torch.cat([p for *_, p in _blocks(features, labels, num_classes, sigma)])


class _BayesError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, labels, num_classes, sigma):
        want_grad = ctx.needs_input_grad[0]
        total = None
        for lo, hi, f, w, p in _blocks(features.detach(), labels, num_classes, sigma):
            if total is None:
                b = f.shape[0]
                total = f.new_zeros(())
                if want_grad:
                    s_sum = f.new_zeros(b)  # sum_j S_kj
                    sf = torch.zeros_like(f)  # sum_j S_kj f_j
            c = p.argmax(1)  # first maximum on ties
            pmax = p.gather(1, c[:, None])[:, 0]
            total += (1 - pmax).sum()
            if want_grad:
                hit = (labels[None, :] == c[:, None]).to(f.dtype)  # [c, B]: y_j = c_i
                g = w * (hit - pmax[:, None]) * (-1.0 / b)  # G block [c, B]
                s_sum[lo:hi] += g.sum(1)
                s_sum += g.sum(0)
                sf[lo:hi] += g @ f
                sf.addmm_(g.T, f[lo:hi])
        if want_grad:
            grad = (-1.0 / sigma ** 2) * (f * s_sum[:, None] - sf)
            ctx.save_for_backward(grad.to(features.dtype))
        return total / b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def bayes_error(features: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float) -> torch.Tensor:
    """Kernel Bayes-error estimate E (0-d) of ``features`` [B, D] (B >= 2) with integer ``labels`` [B].

    Differentiable in ``features``; the formula and its gradient are in this module's
    docstring. Float64 for float64 features, float32 otherwise.
    """
    num_classes, sigma = _check(features, labels, num_classes, sigma)
    return _BayesError.apply(features, labels, num_classes, sigma)


_MEDIAN_ROWS = 4096


def median_bandwidth(features: torch.Tensor) -> float:
    """The median heuristic: sigma = sqrt(median_{i<j} |f_i - f_j|^2 / 2) (a [B, B] matrix, no grad).

    Over at most 4,096 evenly strided rows, so a whole-set estimate stays O(4096^2) here.
    """
    f = features.detach().float()
    f = f[::math.ceil(len(f) / _MEDIAN_ROWS)]
    d = torch.cdist(f, f).pow(2)
    iu = torch.triu_indices(len(f), len(f), 1, device=f.device)
    return max(math.sqrt(float(d[iu[0], iu[1]].median()) / 2), 1e-12)


@dataclass
class BayesConfig(GeneratorConfig):
    """Settings of a Bayes-error run (see the module docstring for the defaults' sources)."""

    alpha: float = 0.5 / 255
    sigma: float | None = 0.3  # kernel bandwidth on the scaled features; None: median heuristic per batch
    feature_scale: str = "max"  # "max": f / max|f| over the batch (authors'); "l2": unit rows; "none"
    pretrain_epochs: int = 0  # clean surrogate epochs before round 1 (the authors' first surrogate is clean)
    train_surrogate: bool = True  # train one epoch on x + delta per round; False: keep it frozen
    retrain_epochs: int = 0  # > 0: every round, a fresh surrogate trained this many epochs on x + delta
    whole_set: bool = False  # one estimate over all N samples per step instead of one per batch

    def validate(self) -> None:
        super().validate()
        if self.sigma is not None:  # None: the median heuristic
            real_setting("sigma", self.sigma)
        if self.feature_scale not in FEATURE_SCALES:
            raise ValueError(f"feature_scale must be one of {FEATURE_SCALES}, got {self.feature_scale!r}")
        int_setting("pretrain_epochs", self.pretrain_epochs, 0)
        for name in ("train_surrogate", "whole_set"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        int_setting("retrain_epochs", self.retrain_epochs, 0)
        if self.retrain_epochs and not self.train_surrogate:
            raise ValueError("retrain_epochs trains a fresh surrogate every round; it cannot be combined "
                             "with train_surrogate=False")


class Bayes(Method):
    """Maximise the batch's kernel Bayes-error estimate of the surrogate's features."""

    name = "bayes"
    config_class = BayesConfig
    maximize = True

    def train_batches(self, epoch: int) -> int | None:
        return None if self.config.train_surrogate else 0

    def scaled(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()  # bf16 under autocast
        if self.config.feature_scale == "max":
            return f / f.abs().max().clamp_min(1e-12)
        if self.config.feature_scale == "l2":
            return f / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(1e-12)
        return f

    def poison_loss(self, features, logits, labels):
        """E of the scaled features [B, F]; a batch of one sample has no estimate (0)."""
        if len(labels) < 2:
            return features.sum() * 0  # the engine's last batch can hold one sample
        f = self.scaled(features)
        sigma = self.config.sigma if self.config.sigma is not None else median_bandwidth(f)
        # The engine's labels are validated once; bayes_error's range check would sync per step.
        return _BayesError.apply(f, labels, self.num_classes, float(sigma))
