"""The MI estimators of the MI gap (:mod:`ue_fast.metrics`), and the checks and class
means they share with its feature statistics.

- ``gaussian_mi``: [X, P] within class c as a Gaussian with sample covariance
  S = [[S_xx, S_xp], [S_px, S_pp]] (``class_covariance`` of the [N, 2D] concatenation,
  float64): I_c = 1/2 (log det S_xx + log det S_pp - log det S) nats
  (= -1/2 sum_i log(1 - r_i^2), r_i the canonical correlations).
- ``histogram_mi``: a cross-check from 2-D histograms of paired dimensions.
- ``within_class_pca``: the projection both estimators take first.

Every ``mean`` weights classes by frequency among the classes that qualify, which for
the MI gives the conditional MI I(X; P | Y) = sum_c (n_c / n) I_c.
"""
from __future__ import annotations

import math
import warnings

import torch

from .ops import class_covariance
from .ops._checks import check_features, check_int, check_labels, check_num_classes, check_real

__all__ = ["within_class_pca", "gaussian_mi", "histogram_mi"]

# Bytes of float64 class covariances held at once (the [2D x 2D] joint ones).
_COV_BUDGET = 1 << 28


def _check_one(features, labels, num_classes, name: str = "features") -> int:
    num_classes = check_num_classes(num_classes)
    check_features(features, name)
    check_labels(labels, features, num_classes)
    return num_classes


def _check_pair(clean, protected, labels, num_classes) -> int:
    check_features(protected, "protected_feats")
    num_classes = _check_one(clean, labels, num_classes, "clean_feats")
    if clean.shape != protected.shape or clean.device != protected.device:
        raise ValueError(f"clean_feats {tuple(clean.shape)} on {clean.device} and protected_feats "
                         f"{tuple(protected.shape)} on {protected.device} must have the same shape and device")
    return num_classes


def _class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [C] and means [C, D] (0 for an empty class) of float64 x [N, D], labels y [N] int64."""
    counts = torch.bincount(y, minlength=num_classes)
    means = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    return counts, means / counts.clamp_min(1).unsqueeze(1)


def _weighted_mean(per_class: torch.Tensor, counts: torch.Tensor) -> float:
    """Frequency-weighted mean of the finite per-class values; NaN if there are none."""
    ok = torch.isfinite(per_class)
    if not ok.any():
        return float("nan")
    w = counts[ok].to(torch.float64)
    return float((per_class[ok] * w).sum() / w.sum())


def within_class_pca(features: torch.Tensor, labels: torch.Tensor, num_classes: int, dim: int) -> torch.Tensor:
    """Basis [D, dim] float64: the top-``dim`` eigenvectors of the pooled
    within-class covariance sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T, in
    decreasing order of eigenvalue. Formed in one [D, D] product (no per-class
    [C, D, D] tensor), so it scales to many classes.
    """
    num_classes = _check_one(features, labels, num_classes)
    dim = check_int("dim", dim, 1, features.shape[1])
    x, y = features.detach().to(torch.float64), labels.long()
    _, means = _class_means(x, y, num_classes)
    centred = x - means[y]  # [N, D]
    _, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return vecs[:, -dim:].flip(1)


def _project(clean, protected, labels, num_classes, pca_dim):
    """Both feature sets in float64, projected on the clean within-class PCA basis if asked."""
    x, p = clean.detach().to(torch.float64), protected.detach().to(torch.float64)
    if pca_dim is None:
        return x, p
    basis = within_class_pca(x, labels, num_classes, check_int("pca_dim", pca_dim, 1, x.shape[1]))
    return x @ basis, p @ basis


def _logdet_spd(m: torch.Tensor) -> torch.Tensor:
    """log det of a batch [K, d, d] of symmetric positive-definite matrices."""
    chol, info = torch.linalg.cholesky_ex(m)
    if (info != 0).any():
        raise ValueError("a regularised class covariance is not positive definite; increase ridge")
    return 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def _logdet_bias(d: int, n: int) -> float:
    """E[log det S] - log det Sigma for the unbiased covariance S of n Gaussian samples in d
    dimensions: sum_{i=1..d} digamma((n - i) / 2) + d log(2 / (n - 1)) (Wishart; needs n > d)."""
    i = torch.arange(1, d + 1, dtype=torch.float64)
    return float(torch.special.digamma((n - i) / 2).sum()) + d * math.log(2 / (n - 1))


def gaussian_mi(clean_feats: torch.Tensor, protected_feats: torch.Tensor, labels: torch.Tensor,
                num_classes: int, *, ridge: float = 1e-3, pca_dim: int | None = None,
                debias: bool = False) -> dict:
    """Class-conditional Gaussian estimate of I(X; P | Y), in nats.

    Args:
        clean_feats, protected_feats: [N, D] floating, row i of both from the same image.
        labels: [N] integer in [0, num_classes). num_classes: C >= 1.
        ridge: lambda > 0. Each diagonal block gets lambda times its own mean
            variance (S_xx + lambda tr(S_xx)/d I, S_pp likewise, in S too): the
            estimate stays invariant to rescaling X or P alone, where one ridge
            for both would swamp the small within-class variance of good UEs.
            It keeps every log det finite when n_c - 1 < 2d and sets a noise
            floor: a pair of average variance adds at most ~1/2 log(1 / (2 lambda)).
        pca_dim: first project X and P on the top ``pca_dim`` directions of the
            clean features' pooled within-class covariance (``within_class_pca``):
            a fixed map of each variable cannot raise MI, and small subsets need
            it: the plug-in estimate is biased up by ~d^2 / (2 n_c), and once
            n_c - 1 <= d all sample canonical correlations are 1, so 100 images
            per class at D = 512 give a number set by lambda and n_c (a warning
            says so). Fitted on clean features only, the basis is shared by all
            perturbations; fitted on the same sample, it inflates the estimate on
            isotropic features, little where the spectrum decays, as in trained
            networks.
        debias: subtract the exact finite-sample bias of the three log dets
            (Wishart expectation, ``_logdet_bias``; a function of n_c and d only):
            independent features then average 0 (single values can be < 0);
            classes need n_c > 2d. A gap at equal n_c and d does not change.

    Returns dict: ``per_class`` [C] float64 (NaN where n_c < 2, or n_c <= 2d with
    ``debias``), ``mean`` (I(X; P | Y) over the other classes), ``counts`` [C],
    ``dim`` (d, per variable after projection). TypeError / ValueError on bad
    types, shapes, labels, ridge or pca_dim, or when no class qualifies.
    """
    num_classes = _check_pair(clean_feats, protected_feats, labels, num_classes)
    ridge = check_real("ridge", ridge, positive=True)
    x, p = _project(clean_feats, protected_feats, labels, num_classes, pca_dim)
    d = x.shape[1]
    counts = torch.bincount(labels.long(), minlength=num_classes).cpu()
    used = torch.nonzero(counts >= (2 * d + 1 if debias else 2)).flatten().tolist()
    if not used:
        raise ValueError(f"no class has {2 * d + 1 if debias else 2} or more samples "
                         f"(largest class: {int(counts.max())})")
    smallest = int(counts[used].min())
    if smallest - 1 < 2 * d:
        warnings.warn(f"a class has {smallest} samples for a {2 * d}-d joint covariance: the "
                      "estimate is set by the ridge, not the data; pass pca_dim", stacklevel=2)
    joint = torch.cat([x, p], dim=1)  # [N, 2d]
    per_class = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    step = max(1, _COV_BUDGET // (8 * (2 * d) ** 2))  # classes per class_covariance call
    for i in range(0, len(used), step):
        chunk = used[i:i + step]
        lo, hi = chunk[0], chunk[-1] + 1
        rows = (labels >= lo) & (labels < hi)
        _, _, cov = class_covariance(joint[rows], (labels[rows] - lo).long(), hi - lo)
        cov = cov[torch.tensor(chunk, device=cov.device) - lo]  # [K, 2d, 2d]
        diag = torch.diagonal(cov, dim1=-2, dim2=-1)  # [K, 2d]
        scale = torch.stack([diag[:, :d].mean(1), diag[:, d:].mean(1)], 1)  # [K, 2]
        # A block with no variance carries no information; any positive ridge then gives I_c = 0.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        reg = cov + torch.diag_embed(ridge * scale.repeat_interleave(d, dim=1))
        mi = 0.5 * (_logdet_spd(reg[:, :d, :d]) + _logdet_spd(reg[:, d:, d:]) - _logdet_spd(reg))
        per_class[chunk] = mi.clamp_min(0).cpu()  # >= 0 by Fischer's inequality, up to rounding
    for c in used if debias else ():
        per_class[c] -= 0.5 * (2 * _logdet_bias(d, int(counts[c])) - _logdet_bias(2 * d, int(counts[c])))
    return {"per_class": per_class, "mean": _weighted_mean(per_class, counts),
            "counts": counts, "dim": d}


def histogram_mi(clean_feats: torch.Tensor, protected_feats: torch.Tensor, labels: torch.Tensor,
                 num_classes: int, *, bins: int | None = None, pca_dim: int | None = None) -> dict:
    """Histogram cross-check: mean over paired dimensions j of I(x_j; p_j | Y), in nats.

    Per class c and dimension j, x_j and p_j are cut into ``bins`` equal-frequency
    bins (class quantiles; a constant column falls in one bin) and

        I_cj = sum_ab q_ab log(q_ab / (q_a q_b)) - (m_ab - m_a - m_b + 1) / (2 n_c)

    (q: bin frequencies, m: non-empty cells; the Miller-Madow correction of the
    plug-in bias, which can leave independent pairs slightly below 0), averaged
    over j. ``gaussian_per_class``: the Gaussian MI of the same pairs, mean_j
    -1/2 log(1 - rho_cj^2); for Gaussian pairs the two agree up to what binning
    loses (much at 4 bins, a few percent at 16+), for mutually independent pairs
    both equal ``gaussian_mi`` / D. Dependence across dimensions is not seen.

    ``bins``: B >= 2 per axis, default round(sqrt(n_c / 5)) in [2, 32] per class
    (about 5 samples per cell). ``pca_dim``: as in ``gaussian_mi``; one basis for
    both, so dimension j pairs up. Returns dict: ``per_class``, ``gaussian_per_class``
    [C] float64 (NaN where n_c < max(B, 3)), ``mean``, ``gaussian_mean``, ``counts``.
    """
    num_classes = _check_pair(clean_feats, protected_feats, labels, num_classes)
    if bins is not None:
        bins = check_int("bins", bins, 2)
    x, p = _project(clean_feats, protected_feats, labels, num_classes, pca_dim)
    counts = torch.bincount(labels.long(), minlength=num_classes).cpu()
    per_class = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    gauss = per_class.clone()
    for c, n in enumerate(counts.tolist()):
        b = bins if bins is not None else min(32, max(2, round(math.sqrt(n / 5))))
        if n < max(b, 3):
            continue
        rows = labels == c
        xc, pc = x[rows], p[rows]  # [n, D]
        bx, bp = _quantile_bins(xc, b), _quantile_bins(pc, b)  # [D, n]
        table = torch.zeros(xc.shape[1], b * b, dtype=torch.float64, device=x.device)
        table.scatter_add_(1, bx * b + bp, torch.ones_like(bx, dtype=torch.float64))
        q = table.view(-1, b, b) / n  # [D, b, b]
        qa, qb = q.sum(2, keepdim=True), q.sum(1, keepdim=True)
        terms = torch.where(q > 0, q * torch.log(q / (qa * qb)), torch.zeros_like(q))
        nonempty = (q > 0).sum((1, 2)) - (qa > 0).sum((1, 2)) - (qb > 0).sum((1, 2)) + 1
        per_class[c] = float((terms.sum((1, 2)) - nonempty / (2 * n)).mean())
        xs, ps = xc - xc.mean(0), pc - pc.mean(0)
        denom = (xs.square().sum(0) * ps.square().sum(0)).sqrt()
        rho = torch.where(denom > 0, (xs * ps).sum(0) / denom, torch.zeros_like(denom))
        gauss[c] = float((-0.5 * torch.log1p(-rho.square().clamp_max(1 - 1e-12))).mean())
    if not torch.isfinite(per_class).any():
        raise ValueError(f"no class has enough samples for a histogram (counts {counts.tolist()})")
    return {"per_class": per_class, "mean": _weighted_mean(per_class, counts),
            "gaussian_per_class": gauss, "gaussian_mean": _weighted_mean(gauss, counts), "counts": counts}


def _quantile_bins(v: torch.Tensor, b: int) -> torch.Tensor:
    """Bin index [D, n] int64 in [0, b) of each column of v [n, D] by its own quantiles."""
    q = torch.linspace(0, 1, b + 1, dtype=v.dtype, device=v.device)[1:-1]
    edges = torch.quantile(v, q, dim=0).T.contiguous()  # [D, b - 1]
    return torch.searchsorted(edges, v.T.contiguous(), right=True)
