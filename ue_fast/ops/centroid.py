"""Centroid form of the MI-UE poison loss: features against their class centroid, centroids apart.

Linear in the batch size (the supervised-contrastive form, ``supcon_loss``, is quadratic).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_features, check_labels, check_num_classes, check_real
from ._dispatch import resolve, triton_kernels

EPS = 1e-8  # norm clamp of rows and centroids, as in F.normalize(eps=1e-8)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_from_sums(S: torch.Tensor, counts: torch.Tensor, batch: int, inter_weight: float) -> torch.Tensor:
    """The loss from the class sums S [C, D] and class counts [C]; differentiable in S.

    O(C D), no host sync: the P < 2 case is a ``torch.where``, not a Python branch.
    """
    n = counts.to(S.dtype).clamp_min(1.0)  # [C]; absent classes have S_c = 0
    m = F.normalize(S / n[:, None], dim=1, eps=EPS)  # [C, D] unit centroids (0 when absent)
    intra = -(S * m).sum() / batch
    P = (counts > 0).sum().to(S.dtype)
    total = m.sum(dim=0)  # [D]
    pairs = total.dot(total) - (m * m).sum()  # sum over ordered pairs c != c' of m_c . m_c'
    inter = torch.where(P >= 2, pairs / (P * (P - 1)).clamp_min(1.0), torch.zeros_like(pairs))
    return intra + inter_weight * inter


def _class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Samples per class [C] (int64). index_add_ instead of bincount, whose output size costs a sync."""
    ones = torch.ones_like(labels, dtype=torch.int64)
    return torch.zeros(num_classes, dtype=torch.int64, device=labels.device).index_add_(0, labels, ones)


def centroid_loss_ref(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      inter_weight: float = 1.0) -> torch.Tensor:
    """Pure-PyTorch :func:`centroid_loss` (the test oracle's twin and the CPU fallback).

    Linear in B: class sums with ``index_add`` (deterministic on the CPU; on CUDA it uses
    float atomics, so run-to-run bits may differ there; the Triton backend does not).
    """
    return centroid_loss(features, labels, num_classes, inter_weight, backend="torch")


def _kernels():
    triton_kernels()  # raises BackendUnavailableError saying how to get Triton
    from ue_fast.kernels import centroid

    return centroid


# The op behind both backends: (S [C, D], norms [B]) in the accumulation dtype, with
# S_c = sum_{y_i = c} f_i / max(|f_i|, eps) and the unclamped row norms |f_i| (for the
# backward). C = counts.shape[0]; counts [C] int64 are the class sizes.
@torch.library.custom_op("ue_fast::centroid_class_sums", mutates_args=())
def _class_sums_op(features: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(features.dtype)
    num_classes = counts.shape[0]
    if backend == "triton":
        order = torch.sort(labels, stable=True).indices  # [B] int64, rows grouped by class
        starts = torch.cumsum(counts, 0) - counts  # [C] segment offsets in `order`
        return _kernels().class_sums_fwd(features, order, starts, counts, num_classes, acc)
    f = features.to(acc)
    norms = torch.linalg.vector_norm(f, dim=1)  # [B]
    z = f / norms.clamp_min(EPS)[:, None]  # [B, D], as F.normalize(eps=EPS)
    S = torch.zeros(num_classes, f.shape[1], dtype=acc, device=f.device).index_add_(0, labels, z)
    return S, norms


@_class_sums_op.register_fake
def _(features, labels, counts, backend):
    acc = _acc_dtype(features.dtype)
    return (features.new_empty((counts.shape[0], features.shape[1]), dtype=acc),
            features.new_empty((features.shape[0],), dtype=acc))


@torch.library.custom_op("ue_fast::centroid_class_sums_backward", mutates_args=())
def _class_sums_backward_op(grad_sums: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                            norms: torch.Tensor, backend: str) -> torch.Tensor:
    """dL/dfeatures [B, D] (features' dtype, contiguous) from ``grad_sums`` = dL/dS [C, D]."""
    if backend == "triton":
        return _kernels().class_sums_bwd(features, labels, norms, grad_sums)
    # In the Triton kernel's rounding order (so the gradient is exactly 0 where D = 1).
    n = norms.clamp_min(EPS)[:, None]  # [B, 1]
    z = features.to(norms.dtype) / n  # [B, D]
    g = grad_sums[labels]  # [B, D]
    zg = torch.where(norms >= EPS, (z * g).sum(1), 0.0)  # [B]; clamp active: no projection
    return ((g - z * zg[:, None]) / n).to(features.dtype).contiguous()


@_class_sums_backward_op.register_fake
def _(grad_sums, features, labels, norms, backend):
    return features.new_empty(features.shape)


def _class_sums_setup_context(ctx, inputs, output):
    features, labels, counts, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(features, labels, output[1])


def _class_sums_backward(ctx, grad_sums, grad_norms):
    features, labels, norms = ctx.saved_tensors
    return _class_sums_backward_op(grad_sums, features, labels, norms, ctx.backend), None, None, None


_class_sums_op.register_autograd(_class_sums_backward, setup_context=_class_sums_setup_context)


def centroid_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  inter_weight: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    r"""Intra-class alignment to centroids plus inter-class centroid similarity (scalar).

    With ``z_i = f_i / max(|f_i|, 1e-8)``, for each class c present in the batch
    ``mu_c`` = mean of the ``z_i`` with ``y_i = c`` and ``m_c = mu_c / max(|mu_c|, 1e-8)``:

        L = -(1/B) sum_i z_i . m_{y_i}
            + inter_weight * 1/(P(P-1)) sum_{c != c'} m_c . m_{c'}

    over ordered pairs of distinct present classes (P of them; the inter term is 0 when
    P < 2). Minimising L pulls same-class features together and pushes centroids apart.
    Gradients flow through the centroids.

    Computation: L depends on the features only through the class sums
    ``S_c = sum_{y_i = c} z_i`` [C, D], because ``sum_{i in c} z_i . m_c = S_c . m_c`` and
    ``sum_{c != c'} m_c . m_c' = |sum_c m_c|^2 - sum_c |m_c|^2`` (absent classes have
    ``S_c = 0``, so ``m_c = 0``). S is the custom op ``ue_fast::centroid_class_sums`` (both
    backends; ``torch.compile`` sees one node). Its Triton backend computes S in one pass over
    the features (rows sorted by label, no atomics: deterministic), its torch backend with
    ``index_add``; backward, both map ``G = dL/dS`` [C, D] to
    ``dF_i = r_i (g_i - z_i (z_i . g_i))`` with ``g_i = G[y_i]`` and ``r_i = 1/max(|f_i|, 1e-8)``
    (only ``r_i g_i`` where ``|f_i| < 1e-8``, as torch's gradient of ``f / clamp_min(|f|, eps)``).
    The O(C D) rest is plain torch, traced and differentiated as usual. Cost:
    O(B D + C D) time and O(C D) extra memory.

    Args:
        features: [B, D] float tensor (any strides).
        labels: [B] integer tensor with values in [0, num_classes).
        num_classes: C >= 1; classes absent from the batch are ignored.
        inter_weight: finite weight of the inter-class term.
        backend: "auto", "triton" or "torch" (see ``ue_fast.ops._dispatch``).

    Returns:
        0-d tensor: in features' dtype for float32/float64; float16/bfloat16 inputs are
        computed in float32 and return float32.
    """
    check_features(features)
    num_classes = check_num_classes(num_classes)
    check_labels(labels, features, num_classes)
    inter_weight = check_real("inter_weight", inter_weight)  # unchecked when compiled (see check_real)
    which = resolve("centroid_loss", backend, features.device, ("triton", "torch"))
    counts = _class_counts(labels, num_classes)  # [C]
    S, _ = _class_sums_op(features, labels, counts, which)  # [C, D]
    return _loss_from_sums(S, counts, features.shape[0], inter_weight)
