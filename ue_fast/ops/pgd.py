"""``pgd_step_``: one projected-gradient step on a perturbation, in place.

The update of unlearnable-example generation (MI-UE, EM, AP, ...), for a
perturbation ``delta`` of clean images ``clean`` in [0, 1] and the gradient
``grad`` of the poison loss with respect to ``delta``:

L-inf (``norm="linf"``), elementwise, with ``s = -1`` (descend) or ``+1``
(``maximize=True``) and ``sign(0) = 0``::

    delta <- clip(delta + s * step_size * m * sign(grad), -eps, eps)
    delta <- clip(clean + delta, 0, 1) - clean

L2 (``norm="l2"``), per sample n, with ``g_n = m * grad_n`` (norms over all of
a sample's elements)::

    delta_n <- delta_n + s * step_size * g_n / |g_n|_2        (no move when g_n = 0)
    delta_n <- delta_n * min(1, eps / |delta_n|_2)
    delta_n <- clip(clean_n + delta_n, 0, 1) - clean_n

``m`` is the mask (1 without one): it scales the step only, so pixels outside
it do not move, but both clips apply everywhere.

The Triton L2 path reads delta and grad once for the three per-sample sums
|g|^2, |delta|^2 and delta.g and gets the projection factor from
``|delta + u g|^2 = |delta|^2 + 2u delta.g + u^2 |g|^2`` (``u = s step/|g|``), so
it writes delta in the second pass. That identity loses relative accuracy
(~1e-7 |delta|^2/eps^2 in float32) only when delta starts far outside the ball,
which a PGD loop never does. Sums are accumulated in float32: gradients whose
squares underflow float32 (below ~1e-19 per element) count as zero.

Both backends run inside the torch.library op ``ue_fast::pgd_step_`` (declared to
mutate delta, the backend a string argument), so ``torch.compile`` traces a step as
one node with no graph break. Its float arguments are specialised there: each
distinct (eps, step_size) compiles once.
"""
from __future__ import annotations

import torch

from ._checks import check_real
from ._dispatch import resolve, triton_kernels

_NORMS = ("linf", "l2")


def _check(delta, grad, clean, eps, step_size, norm, mask):
    """Validate at the public boundary; return (eps, step_size) as Python floats."""
    for name, t in (("delta", delta), ("grad", grad), ("clean", clean)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if delta.dim() == 0:
        raise ValueError("delta must have shape [N, ...] with N >= 1, got a 0-d tensor")
    if delta.numel() == 0:
        raise ValueError(f"delta is empty (shape {tuple(delta.shape)})")
    for name, t in (("grad", grad), ("clean", clean)):
        if t.shape != delta.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but delta has shape {tuple(delta.shape)}")
        if t.device != delta.device:
            raise ValueError(f"{name} is on {t.device} but delta is on {delta.device}")
    if any(st == 0 and sz > 1 for st, sz in zip(delta.stride(), delta.shape)):
        raise ValueError(f"delta has overlapping elements (stride {delta.stride()}), it cannot be updated in place")
    if not isinstance(norm, str) or norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.is_complex():
            raise TypeError(f"mask must be bool, integer or floating, got dtype {mask.dtype}")
        if mask.device != delta.device:
            raise ValueError(f"mask is on {mask.device} but delta is on {delta.device}")
        try:
            ok = torch.broadcast_shapes(mask.shape, delta.shape) == delta.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to delta's shape {tuple(delta.shape)}")
    eps = check_real("eps", eps, nonnegative=True)
    step_size = check_real("step_size", step_size, nonnegative=True)
    return eps, step_size


# The op behind both backends, on validated input; it returns nothing (an op may not return
# an alias of its input), the public function returns delta. Registered with the low-level
# API, not torch.library.custom_op: custom_op's Python kernel that bumps the version of a
# mutated argument rebuilds the schema's argument list once per argument, which in eager
# mode costs more host time than a small step itself; here the dispatcher's C++ fallbacks
# bump delta's version (and refuse an in-place update of a leaf that requires grad
# outside no_grad, as for any in-place torch op).
_LIB = torch.library.Library("ue_fast", "FRAGMENT")
_LIB.define("pgd_step_(Tensor(a!) delta, Tensor grad, Tensor clean, Tensor? mask, float eps, float step_size, "
            "str norm, bool maximize, str backend) -> ()")


def _pgd_step_impl(delta, grad, clean, mask, eps, step_size, norm, maximize, backend):
    eps = check_real("eps", eps, nonnegative=True)  # real values even under torch.compile
    step_size = check_real("step_size", step_size, nonnegative=True)
    if backend == "triton":
        triton_kernels()  # raises BackendUnavailableError saying how to get Triton
        from ue_fast.kernels import pgd as _kernels

        _kernels.pgd_step(delta, grad, clean, eps, step_size, norm, maximize, mask)
    else:
        _pgd_step_torch(delta, grad, clean, eps, step_size, norm, maximize, mask)


_LIB.impl("pgd_step_", _pgd_step_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("ue_fast::pgd_step_", lib=_LIB)
def _(delta, grad, clean, mask, eps, step_size, norm, maximize, backend):
    return None


_pgd_step_op = torch.ops.ue_fast.pgd_step_.default


def pgd_step_(delta, grad, clean, *, eps, step_size, norm="linf", maximize=False, mask=None, backend="auto"):
    """One PGD step on ``delta``, in place (formulas in the module docstring).

    Args:
        delta: [N, ...] float32/bfloat16/float16/float64, updated in place; it may
            be a leaf that requires grad (the update runs under ``torch.no_grad``,
            like an optimizer step) and may be a non-contiguous view.
        grad: [N, ...] like delta, any floating dtype: d loss / d delta.
        clean: [N, ...] like delta, any floating dtype: the images, in [0, 1].
        eps: radius of the L-inf or L2 ball, >= 0 (Python number).
        step_size: step length (alpha), >= 0.
        norm: "linf" (signed-gradient step) or "l2" (normalised-gradient step).
        maximize: ascend the loss instead of descending it.
        mask: None or a bool/integer/float tensor broadcastable to delta
            (e.g. [N,1,H,W], [1,C,H,W], [N,C,H,W]) scaling the step.
        backend: "auto", "triton" or "torch" (see ``ue_fast.ops._dispatch``).

    Arithmetic is float32 (float64 for float64 delta); the result is rounded to
    delta's dtype, so in half types the bounds hold to one rounding of that
    dtype. Non-finite gradients are not checked (that would need a host sync).

    Returns:
        ``delta`` itself.
    """
    eps, step_size = _check(delta, grad, clean, eps, step_size, norm, mask)
    chosen = resolve("pgd_step_", backend, delta.device, ("triton", "torch"))
    with torch.no_grad():
        _pgd_step_op(delta, grad, clean, mask, eps, step_size, norm, bool(maximize), chosen)
    return delta


def pgd_step_ref_(delta, grad, clean, *, eps, step_size, norm="linf", maximize=False, mask=None):
    """Pure-PyTorch ``pgd_step_`` (same arguments but ``backend``): the reference and CPU fallback."""
    eps, step_size = _check(delta, grad, clean, eps, step_size, norm, mask)
    with torch.no_grad():
        _pgd_step_torch(delta, grad, clean, eps, step_size, norm, bool(maximize), mask)
    return delta


def _pgd_step_torch(delta, grad, clean, eps, step_size, norm, maximize, mask):
    """In-place PyTorch implementation on validated input (one temporary the size of delta)."""
    cd = torch.float64 if delta.dtype == torch.float64 else torch.float32
    work = delta if delta.dtype == cd else delta.to(cd)
    a = step_size if maximize else -step_size
    if mask is not None and mask.is_floating_point() and mask.dtype != cd:
        mask = mask.to(cd)
    if norm == "linf":
        s = torch.sign(grad).to(cd)  # sign in grad's own dtype: a tiny float64 value keeps its sign
        if mask is not None:
            s.mul_(mask)
        work.add_(s, alpha=a)
        e = min(eps, torch.finfo(cd).max)  # torch refuses scalars beyond the dtype's range
        work.clamp_(-e, e)
    else:
        if work.dim() == 1:  # N samples of one element: per-sample views [N, 1]
            work_, grad = work.unsqueeze(1), grad.unsqueeze(1)
            mask = mask.unsqueeze(-1) if mask is not None and mask.dim() >= 1 else mask
        else:
            work_ = work
        dims = tuple(range(1, work_.dim()))
        bshape = (-1,) + (1,) * len(dims)
        g = grad.to(cd)
        if mask is not None:
            g = g.mul_(mask) if g is not grad else g * mask
        gn = torch.linalg.vector_norm(g, dim=dims)  # [N]
        has_g = gn > 0
        u = torch.where(has_g, a / torch.where(has_g, gn, 1.0), 0.0)
        work_.addcmul_(g, u.view(bshape))
        dn = torch.linalg.vector_norm(work_, dim=dims)  # [N]
        over = dn > eps
        work_.mul_(torch.where(over, eps / torch.where(over, dn, 1.0), 1.0).view(bshape))
    c = clean.to(cd)
    work.add_(c).clamp_(0.0, 1.0).sub_(c)
    if work is not delta:
        delta.copy_(work)
