r"""The kernel Bayes-error estimate of Bayes-error unlearnable examples (Zhang et al., AAAI 2026).

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

The generator that maximises it is ``ue_fast.methods.bayes``.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._checks import check_features, check_labels, check_num_classes, check_real

# Rows per block: a [chunk, B] block stays around 16 M elements (64 MB in float32).
_CHUNK_ELEMS = 1 << 24


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


def bayes_error(features: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float, *,
                validate: bool = True) -> torch.Tensor:
    """Kernel Bayes-error estimate E (0-d) of ``features`` [B, D] (B >= 2) with integer ``labels`` [B].

    Differentiable in ``features``; the formula and its gradient are in this module's
    docstring. Float64 for float64 features, float32 otherwise. ``validate=False`` skips the
    checks (the label-range check reads the labels back to the host: a generator checks once).
    """
    if validate:
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


def bayes_error_ref(features: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float) -> torch.Tensor:
    """The estimate by autograd through :func:`loo_kernel_posterior` (keeps the [B, B] weights):
    the reference of :func:`bayes_error` in the tests."""
    p = loo_kernel_posterior(features, labels, num_classes, sigma)
    return (1 - p.max(1).values).mean()
