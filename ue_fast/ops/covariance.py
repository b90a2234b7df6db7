"""Per-class feature covariance: ``class_covariance`` and its PyTorch reference.

For features ``x_i`` [N, D] with labels ``y_i`` in [0, C), and ``n_c`` the
number of samples of class c:

    counts[c] = n_c                                                  # [C] int64
    means[c]  = (1 / n_c) sum_{i: y_i = c} x_i                       # [C, D]    (0 if n_c = 0)
    cov[c]    = (1 / (n_c - 1)) sum_{i: y_i = c} (x_i - mu_c)(x_i - mu_c)^T
                                                                     # [C, D, D] (0 if n_c < 2)

Computed in two passes: the means are accumulated in float64, then the rows are
centred (in float64, rounded once to the compute dtype) and the Gram matrix of
the centred rows is formed. The one-pass form E[x x^T] - mu mu^T cancels
catastrophically when the features sit far from zero (1e4 + N(0, 1) in float32
loses every digit), so it is never used.

Outputs are float32 for float16/bfloat16/float32 features and float64 for
float64 features. The op is not differentiable: its outputs carry no gradient.
This is the intra-class statistic that the MI theory of unlearnable examples is
about (MI falls with the conditional covariance of same-class features).
"""
from __future__ import annotations

import torch

from ._checks import check_features, check_labels, check_num_classes
from ._dispatch import extension, resolve

_OFFERED = ("cuda", "cpp", "torch")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("ue_fast::class_covariance", mutates_args=())
def _class_covariance_ext(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The extension kernel (C++ on CPU tensors, CUDA on CUDA tensors); inputs validated."""
    # Imported here: ue_fast.kernels may import triton, which ue_fast.ops loads lazily.
    from ue_fast.kernels._common import FILL_OUTPUTS_WITH_NAN, new_output

    d = features.shape[1]
    c, dev, dtype = num_classes, features.device, _out_dtype(features.dtype)
    counts = torch.empty((c,), dtype=torch.int64, device=dev)  # [C]
    if FILL_OUTPUTS_WITH_NAN:
        counts.fill_(-1)  # int64 has no NaN; -1 marks "unwritten"
    means = new_output((c, d), dtype=dtype, device=dev)  # [C, D]
    cov = new_output((c, d, d), dtype=dtype, device=dev)  # [C, D, D]
    ext = extension()
    if dev.type == "cuda":
        ext.class_covariance_cuda(features, labels, c, counts, means, cov)
    else:
        ext.class_covariance_cpu(features, labels, c, counts, means, cov)
    return counts, means, cov


@_class_covariance_ext.register_fake
def _(features, labels, num_classes):
    d = features.shape[1]
    dtype = _out_dtype(features.dtype)
    return (
        features.new_empty((num_classes,), dtype=torch.int64),
        features.new_empty((num_classes, d), dtype=dtype),
        features.new_empty((num_classes, d, d), dtype=dtype),
    )


def class_covariance(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class sample counts, means and unbiased covariances.

    Args:
        features: [N, D] float16/bfloat16/float32/float64, any strides.
        labels: [N] integer class indices in [0, num_classes), same device.
        num_classes: C >= 1; classes absent from ``labels`` get count 0, mean 0, cov 0.
        backend: "auto", "cuda" (CUDA tensors), "cpp" (CPU tensors) or "torch".

    Returns:
        counts [C] int64, means [C, D], cov [C, D, D]: float32, or float64 for
        float64 features. ``cov[c]`` divides by ``n_c - 1`` and is zero when
        ``n_c < 2``. See the module docstring for the formula.

    Raises:
        TypeError: non-tensor or non-floating features, non-integer labels or num_classes.
        ValueError: wrong shapes, an empty batch, labels out of range, num_classes < 1.
    """
    num_classes = check_num_classes(num_classes)
    check_features(features)
    check_labels(labels, features, num_classes)
    which = resolve("class_covariance", backend, features.device, _OFFERED)
    features, labels = features.detach(), labels.detach()
    if which == "torch":
        return class_covariance_ref(features, labels, num_classes)
    return _class_covariance_ext(features, labels, num_classes)


def class_covariance_ref(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``class_covariance`` (same contract, no validation): the test
    oracle's twin and the fallback on any device.

    One ``index_add_`` gives the float64 class sums; rows are sorted by class and
    each class's block is centred in float64, rounded once to the compute dtype,
    and multiplied by its transpose. Peak memory: one [N, D] float64 copy.
    """
    d = features.shape[1]
    c = num_classes
    dtype = _out_dtype(features.dtype)
    labels = labels.long()
    counts = torch.bincount(labels, minlength=c)  # [C]
    sums = torch.zeros(c, d, dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.to(torch.float64))  # [C, D]
    means64 = sums / counts.clamp_min(1).unsqueeze(1).to(torch.float64)  # [C, D]; empty class -> 0
    grouped = features[torch.argsort(labels, stable=True)]  # [N, D], rows grouped by class in input order
    cov = torch.zeros(c, d, d, dtype=dtype, device=features.device)  # [C, D, D]
    start = 0
    for k, n_k in enumerate(counts.tolist()):
        if n_k >= 2:
            seg = (grouped[start:start + n_k].to(torch.float64) - means64[k]).to(dtype)  # [n_k, D], centred
            torch.matmul(seg.T, seg, out=cov[k])
            cov[k].div_(n_k - 1)
        start += n_k
    return counts, means64.to(dtype), cov
