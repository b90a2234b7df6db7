"""The MI gap and feature statistics of protected images, read through a model
trained on clean data.

A clean-trained model's penultimate layer f maps clean images x and protected
images x + delta to features X = f(x), P = f(x + delta), both [N, D]. With labels Y:

- ``gaussian_mi``, ``histogram_mi`` (and ``within_class_pca``, their projection): the MI
  estimators, in :mod:`ue_fast.mi` and exported here too;
- ``intra_class_cosine``, ``class_covariance_trace``: what MI-UE drives.

Every ``mean`` weights classes by frequency among the classes that qualify,
which for the MI gives the conditional MI I(X; P | Y) = sum_c (n_c / n) I_c;
per-class values of classes that do not qualify are NaN.

**The MI gap.** MI-UE (arXiv:2603.03725) reports an "MI gap" beside the accuracy
gap (clean-trained minus poison-trained test accuracy), MI-UE 0.2153, EM 0.0722,
AP 0.1251, REM 0.0832, summarised as the *reduction* of MI between clean and
poisoned features. The authors' code (github.com/hala64/mi-ue at 4cd3879) has no
MI estimator and we found no definition of its estimator or reference, so here

    MI gap = I(X; X' | Y) - I(X; P | Y),     X' = f(x'), x' a benign copy of x,

x' by default x plus uniform integer noise in [-e, e], e the L-inf budget the
protected set shows (max |x + delta - x| in 0..255 units): the random-noise
control of the UE literature, learnable at the same budget, so a perturbation
that removes no more information than noise scores about 0 and an effective UE
scores > 0. (``reference="hflip"`` uses the flipped image, a view augmentation
produces; it changes features more than small noise, so gaps come out lower.)
Both terms share estimator, projection and sample, so the estimator's bias
largely cancels. The numbers are not on the paper's scale (estimator, feature
dimension and reference unknown): compare methods under one configuration.
"""
from __future__ import annotations

import math

import torch

from .mi import _check_one, _class_means, _weighted_mean, gaussian_mi, histogram_mi, within_class_pca
from .ops._checks import check_int, check_num_classes

__all__ = [
    "extract_features", "within_class_pca", "gaussian_mi", "histogram_mi",
    "intra_class_cosine", "class_covariance_trace", "mi_report",
]

@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 512,
                     device=None) -> torch.Tensor:
    """Features [N, F] float32 (on the CPU) of uint8 images [N, 3, H, W].

    Eval mode (the previous mode is restored), no gradients, on ``device`` (default:
    the model's); each batch is moved there and scaled by 1/255 on its own, so one
    float batch exists at a time. The model returns ``(features [B, F], logits)``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images must be a uint8 tensor, got {got}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must have shape [N, 3, H, W] with N >= 1, got {tuple(images.shape)}")
    batch_size = check_int("batch_size", batch_size, 1)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device).float().div_(255)
            result = model(x)
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise TypeError("model must return (features, logits)")
            out.append(result[0].float().reshape(x.shape[0], -1).cpu())
        return torch.cat(out)
    finally:
        model.train(was_training)


def intra_class_cosine(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Mean pairwise cosine similarity of same-class features, pairs i != j.

    With u_i = f_i / |f_i| (u_i = 0 for a zero vector, whose cosines count as 0)
    and s_c = sum_{i in c} u_i,

        cos_c = (|s_c|^2 - sum_{i in c} |u_i|^2) / (n_c (n_c - 1))

    in float64, linear in N. Returns dict: ``per_class`` [C] float64 (NaN where
    n_c < 2), ``mean`` (frequency-weighted), ``counts``.
    """
    num_classes = _check_one(features, labels, num_classes)
    u, y = torch.nn.functional.normalize(features.detach().to(torch.float64), dim=1), labels.long()
    counts, mean_u = _class_means(u, y, num_classes)
    self_sq = torch.zeros(num_classes, dtype=u.dtype, device=u.device).index_add_(0, y, u.square().sum(1))
    sum_sq = (mean_u * counts.unsqueeze(1)).square().sum(1)  # |s_c|^2
    return _summary((sum_sq - self_sq) / (counts * (counts - 1)).clamp_min(1), counts)


def class_covariance_trace(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Trace of each class's unbiased covariance, tr(cov_c) = sum_{i in c} |x_i - mu_c|^2 / (n_c - 1),
    in float64 without forming the [C, D, D] covariances.

    Returns dict: ``per_class`` [C] float64 (NaN where n_c < 2), ``mean``
    (frequency-weighted), ``counts``.
    """
    num_classes = _check_one(features, labels, num_classes)
    x, y = features.detach().to(torch.float64), labels.long()
    counts, means = _class_means(x, y, num_classes)
    sq = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    sq.index_add_(0, y, (x - means[y]).square().sum(1))
    return _summary(sq / (counts - 1).clamp_min(1), counts)


def _summary(per_class: torch.Tensor, counts: torch.Tensor) -> dict:
    """The result of a per-class statistic that needs n_c >= 2."""
    per_class, counts = per_class.where(counts >= 2, float("nan")).cpu(), counts.cpu()
    return {"per_class": per_class, "mean": _weighted_mean(per_class, counts), "counts": counts}


def _noise_copy(clean: torch.Tensor, protected: torch.Tensor, seed: int, chunk: int = 4096):
    """(clean [N, 3, H, W] uint8 plus uniform integer noise in [-e, e], clipped to 0..255;
    e = max |protected - clean|), in chunks so no full-size wider copy exists."""
    eps = max(int((protected[i:i + chunk].to(torch.int16) - clean[i:i + chunk].to(torch.int16)).abs().max())
              for i in range(0, clean.shape[0], chunk))
    gen, out = torch.Generator().manual_seed(seed), torch.empty_like(clean)
    for i in range(0, clean.shape[0], chunk):
        part = clean[i:i + chunk].to(torch.int16)
        noise = torch.randint(-eps, eps + 1, part.shape, generator=gen, dtype=torch.int16)
        out[i:i + chunk] = (part + noise.to(part.device)).clamp_(0, 255).to(torch.uint8)
    return out, eps


def mi_report(model: torch.nn.Module, clean_images: torch.Tensor, protected_images: torch.Tensor,
              labels: torch.Tensor, num_classes: int, *, reference: str = "noise",
              reference_images: torch.Tensor | None = None, seed: int = 0, pca_dim: int | None = 8,
              ridge: float = 1e-3, bins: int | None = None, batch_size: int = 512, device=None) -> dict:
    """Everything in this module for one protected set, as JSON-serialisable values.

    ``model``: trained on clean data. Images: uint8 [N, 3, H, W], ``protected_images[i]``
    the protected copy of ``clean_images[i]``. The benign copies x' of the MI gap
    (module docstring): ``reference_images`` if given, else ``reference`` "noise"
    (uniform noise at the protected set's budget, drawn from ``seed``) or "hflip".
    ``pca_dim`` (None: no projection; capped at F) and ``ridge`` go to both
    estimators: 8 keeps the 16-d joint covariance well determined at 100 images
    per class (the debiased Gaussian MI needs n_c > 2 pca_dim) and covers most
    of the within-class variance of a trained network's features.

    Returns a dict: ``mi_gap`` (Gaussian, debiased: I(X; X'|Y) - I(X; P|Y)),
    ``mi_clean_protected``, ``mi_clean_reference``; ``histogram`` (the same from
    ``histogram_mi``, with its Gaussian-of-pairs figures); intra-class cosine and
    covariance trace of the protected and the clean features; ``per_class``
    lists (None where a class has too few samples); ``settings``.
    """
    num_classes = check_num_classes(num_classes)
    if reference not in ("noise", "hflip"):
        raise ValueError(f'reference must be "noise" or "hflip", got {reference!r}')
    images = {"clean": clean_images, "protected": protected_images, "reference": reference_images}
    for k, v in images.items():
        if v is not None and (not isinstance(v, torch.Tensor) or v.dtype != torch.uint8):
            raise TypeError(f"{k}_images must be a uint8 tensor, got {getattr(v, 'dtype', type(v).__name__)}")
        if v is not None and v.shape != clean_images.shape:
            raise ValueError(f"{k}_images {tuple(v.shape)} must have the shape of clean_images "
                             f"{tuple(clean_images.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    eps, reference = None, reference if reference_images is None else "given"
    if reference == "hflip":
        images["reference"] = clean_images.flip(-1)
    elif reference == "noise":
        images["reference"], eps = _noise_copy(clean_images, protected_images, check_int("seed", seed, 0))
    x, p, r = (extract_features(model, v, batch_size=batch_size, device=device) for v in images.values())
    labels = labels.cpu()
    if pca_dim is not None:
        pca_dim = min(check_int("pca_dim", pca_dim, 1), x.shape[1])
    g_p, g_r = (gaussian_mi(x, f, labels, num_classes, ridge=ridge, pca_dim=pca_dim, debias=True) for f in (p, r))
    h_p, h_r = (histogram_mi(x, f, labels, num_classes, bins=bins, pca_dim=pca_dim) for f in (p, r))
    cos_p, cos_x = (intra_class_cosine(f, labels, num_classes) for f in (p, x))
    tr_p, tr_x = (class_covariance_trace(f, labels, num_classes) for f in (p, x))
    plain = lambda t: [v if math.isfinite(v) else None for v in t.tolist()]  # noqa: E731  NaN -> None
    return {
        "mi_gap": g_r["mean"] - g_p["mean"],
        "mi_clean_protected": g_p["mean"], "mi_clean_reference": g_r["mean"],
        "histogram": {"mi_gap": h_r["mean"] - h_p["mean"], "mi_clean_protected": h_p["mean"],
                      "mi_clean_reference": h_r["mean"], "gaussian_pairs_clean_protected": h_p["gaussian_mean"],
                      "gaussian_pairs_clean_reference": h_r["gaussian_mean"]},
        "intra_class_cosine_protected": cos_p["mean"], "intra_class_cosine_clean": cos_x["mean"],
        "covariance_trace_protected": tr_p["mean"], "covariance_trace_clean": tr_x["mean"],
        "per_class": {"counts": g_p["counts"].tolist(), "mi_clean_protected": plain(g_p["per_class"]),
                      "mi_clean_reference": plain(g_r["per_class"]),
                      "intra_class_cosine_protected": plain(cos_p["per_class"]),
                      "covariance_trace_protected": plain(tr_p["per_class"])},
        "settings": {"num_images": int(x.shape[0]), "feature_dim": int(x.shape[1]), "dim": g_p["dim"],
                     "pca_dim": pca_dim, "ridge": float(ridge), "bins": bins, "debias": True,
                     "reference": reference, "noise_eps": eps, "seed": seed, "units": "nats"},
    }
