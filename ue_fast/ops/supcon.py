r"""The MI-UE poison loss: supervised contrastive (NT-Xent) over a batch of features.

For features ``f`` [B, D] with labels ``y`` [B] and temperature ``tau``:

    z_i  = f_i / max(|f_i|, 1e-8)
    s_ij = (z_i . z_j) / tau
    A_i  = log sum_j exp(s_ij)                  (all j, including j = i)
    P_i  = log sum_{j: y_j = y_i} exp(s_ij)     (same-label j, including j = i)
    L    = (1/B) sum_i (A_i - P_i)

Minimising L pulls same-class features together and pushes classes apart.
This is the loss of the MI-UE authors' code without the 1e-8 they add to every
exp term: the positive set always contains j = i, so P_i is finite without it
(their guard shifts L by at most about 1e-8 * B / sum_j exp(s_ij)).

Gradient. With ``p_ij = exp(s_ij - A_i)``, ``q_ij = [y_i = y_j] exp(s_ij - P_i)``
and ``s`` symmetric,

    dL/dz_i = (1/(B tau)) sum_j w_ij z_j,   w_ij = p_ij + p_ji - q_ij - q_ji,
    dL/df_i = r_i (g_i - z_i (z_i . g_i))   with g_i = dL/dz_i, r_i = 1/|f_i|,

(``dL/df_i = g_i / 1e-8`` when the norm clamp is active), and
``z_i . g_i = (1/(B tau)) sum_j w_ij (z_i . z_j)`` needs no pass over D.

Backends: "triton" (fused tiled kernels with online log-sum-exp, never storing the
B x B matrix; ``ue_fast.kernels.supcon``) and "torch" (row-chunked normalised GEMMs
that produce the gradient during the forward pass, memory O(B * chunk + B * D)).

Both run inside the custom op ``ue_fast::supcon_loss`` (the backend is a string
argument), differentiated by ``ue_fast::supcon_loss_backward``: ``torch.compile``
traces a call as one opaque node each way, with no graph break, and a backward of
the backward raises, as ``once_differentiable`` did.
"""
from __future__ import annotations

import torch

from ._checks import check_features, check_labels, check_real
from ._dispatch import resolve, triton_kernels

NORM_EPS = 1e-8
# Rows per chunk of the torch path: a [chunk, B] block of similarities stays
# around 16 M elements (64 MB in float32).
_CHUNK_ELEMS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalize(f: torch.Tensor):
    """(z [B, D], r [B], unclamped [B] bool) with z = f * r, r = 1/max(|f|, eps)."""
    norm = torch.linalg.vector_norm(f, dim=1)
    r = 1.0 / norm.clamp_min(NORM_EPS)
    return f * r[:, None], r, norm > NORM_EPS


def _project(z, r, unclamped, g):
    """dL/df from dL/dz = g: r (g - z (z . g)), without the projection where the clamp is active."""
    zg = (z * g).sum(1) * unclamped
    return r[:, None] * (g - z * zg[:, None])


def _supcon_torch(features, labels, temperature: float, chunk: int, need_grad: bool):
    """(loss [], dL/dfeatures [B, D] for a unit upstream gradient, or None): the row-chunked
    torch path, producing the gradient during the forward pass when ``need_grad``."""
    f = features.to(_compute_dtype(features.dtype))
    B = f.shape[0]
    z, r, unclamped = _normalize(f)
    dz = torch.zeros_like(z) if need_grad else None
    total = f.new_zeros(())
    for lo in range(0, B, chunk):
        hi = min(lo + chunk, B)
        s = (z[lo:hi] @ z.T) / temperature  # [c, B]
        same = labels[lo:hi, None] == labels[None, :]  # [c, B]
        lse_all = torch.logsumexp(s, 1)
        lse_pos = torch.logsumexp(s.masked_fill(~same, float("-inf")), 1)
        total += (lse_all - lse_pos).sum()
        if need_grad:
            # g_ij = p_ij - q_ij for this block of rows; w = g + g^T.
            g = torch.exp(s - lse_all[:, None])
            g -= torch.exp(s - lse_pos[:, None]) * same
            dz[lo:hi] += g @ z
            dz.addmm_(g.T, z[lo:hi])
    dfeat = None
    if need_grad:
        dz /= B * temperature
        # Contiguous whatever the features' layout, as the op's fake promises.
        dfeat = _project(z, r, unclamped, dz).to(features.dtype).contiguous()
    return total / B, dfeat


def _triton_supcon():
    triton_kernels()  # raises BackendUnavailableError saying how to get Triton
    from ue_fast.kernels import supcon

    return supcon


# The op behind both backends. Its second output is what the backward needs, empty when
# need_grad is False: for "torch" dL/dfeatures at unit upstream gradient [B, D] (features'
# dtype, contiguous); for "triton" the row statistics (lse_all, lse_pos, rnorm) as [3, B] in
# the accumulation dtype. Shapes depend on the arguments only, never on values.
@torch.library.custom_op("ue_fast::supcon_loss", mutates_args=())
def _supcon_op(features: torch.Tensor, labels: torch.Tensor, temperature: float, backend: str,
               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    temperature = check_real("temperature", temperature, positive=True)  # real value even when compiled
    if backend == "triton":
        lse_all, lse_pos, rnorm = _triton_supcon().supcon_fwd(features, labels, temperature)
        saved = torch.stack((lse_all, lse_pos, rnorm)) if need_grad else features.new_empty((0,))
        return (lse_all - lse_pos).mean(), saved
    chunk = max(1, min(features.shape[0], _CHUNK_ELEMS // features.shape[0]))
    loss, dfeat = _supcon_torch(features, labels, temperature, chunk, need_grad)
    return loss, features.new_empty((0,)) if dfeat is None else dfeat


@_supcon_op.register_fake
def _(features, labels, temperature, backend, need_grad):
    acc = _compute_dtype(features.dtype)
    if not need_grad:
        saved = features.new_empty((0,))
    elif backend == "triton":
        saved = features.new_empty((3, features.shape[0]), dtype=acc)
    else:
        saved = features.new_empty(features.shape)
    return features.new_empty((), dtype=acc), saved


@torch.library.custom_op("ue_fast::supcon_loss_backward", mutates_args=())
def _supcon_backward_op(grad_loss: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                        saved: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """dL/dfeatures [B, D] (features' dtype) from ``grad_loss`` [] and the forward's ``saved``."""
    if backend == "triton":
        lse_all, lse_pos, rnorm = saved.unbind(0)  # rows of a contiguous [3, B]: contiguous
        gout = grad_loss.to(saved.dtype).contiguous()
        return _triton_supcon().supcon_bwd(features, labels, lse_all, lse_pos, rnorm, gout, temperature)
    return saved * grad_loss.to(saved.dtype)


@_supcon_backward_op.register_fake
def _(grad_loss, features, labels, saved, temperature, backend):
    return features.new_empty(features.shape)


def _supcon_setup_context(ctx, inputs, output):
    features, labels, temperature, backend, need_grad = inputs
    ctx.temperature, ctx.backend, ctx.need_grad = temperature, backend, need_grad
    ctx.save_for_backward(features, labels, output[1])


def _supcon_backward(ctx, grad_loss, grad_saved):
    if not ctx.need_grad:
        raise RuntimeError("ue_fast::supcon_loss was called with need_grad=False; it cannot be differentiated")
    features, labels, saved = ctx.saved_tensors
    dfeat = _supcon_backward_op(grad_loss, features, labels, saved, ctx.temperature, ctx.backend)
    return dfeat, None, None, None, None


_supcon_op.register_autograd(_supcon_backward, setup_context=_supcon_setup_context)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, *,
                backend: str = "auto") -> torch.Tensor:
    """MI-UE supervised-contrastive loss of ``features`` [B, D] with integer ``labels`` [B].

    Differentiable in ``features``. Returns a 0-d tensor: float64 for float64
    features, float32 otherwise (float16/bfloat16 features are accumulated in
    float32). ``backend``: "auto", "triton" or "torch" (see ``ue_fast.ops._dispatch``).
    The formula and its gradient are in this module's docstring.
    """
    check_features(features)
    check_labels(labels, features)
    temperature = check_real("temperature", temperature, positive=True)
    which = resolve("supcon_loss", backend, features.device, ("triton", "torch"))
    if which == "triton":
        labels = labels.contiguous()
    # The torch path builds the gradient during the forward pass: only when one is wanted.
    need_grad = torch.is_grad_enabled() and features.requires_grad
    return _supcon_op(features, labels, temperature, which, need_grad)[0]


def supcon_loss_ref(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The PyTorch reference of :func:`supcon_loss` (the "torch" backend)."""
    return supcon_loss(features, labels, temperature, backend="torch")
