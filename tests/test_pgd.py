"""pgd_step_: Triton and PyTorch backends against a plain float64 oracle.

Exactness: both backends compute in float32 and round once to delta's dtype, so
they are compared with the oracle to one unit in the last place of the dtype
plus the float32 rounding of ``clean + delta`` (values near 1: 2^-23), and L2
also to a few 1e-6 relative (norms summed in another order). For L-inf in
float32 with no fractional mask the two backends do the same operations in the
same order and must agree bit for bit.
"""
import math

import pytest
import torch

from _helpers import assert_close
from ue_fast.ops import pgd_step_, pgd_step_ref_

BACKENDS = ["triton", "torch"]
MANT = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
F32_ATOL = 2.0**-22  # float32 rounding of clean + delta and of the difference, near 1


# ----------------------------------------------------------------------------- oracle and helpers


def oracle(delta, grad, clean, eps, step, norm, maximize=False, mask=None):
    """The step in float64, written plainly (per-sample loop for L2)."""
    d, g, c = delta.double().cpu(), grad.double().cpu(), clean.double().cpu()
    m = torch.ones_like(d) if mask is None else mask.double().cpu().expand(d.shape)
    s = 1.0 if maximize else -1.0
    if norm == "linf":
        d = (d + s * step * m * torch.sign(g)).clamp(-eps, eps)
    else:
        d = d.clone()
        for n in range(d.shape[0]):
            gm = g[n] * m[n]
            gn = math.sqrt(float((gm * gm).sum()))
            if gn > 0:
                d[n] = d[n] + s * step * gm / gn
            dn = math.sqrt(float((d[n] * d[n]).sum()))
            if dn > eps:
                d[n] = d[n] * (eps / dn)
    return (c + d).clamp(0.0, 1.0) - c


def ulp(x, dtype):
    """Spacing of ``dtype`` at |x| (float64 tensor), subnormals included."""
    emin = int(math.log2(torch.finfo(dtype).tiny))
    _, e = torch.frexp(x.double().abs())
    e = torch.where(x == 0, torch.full_like(e, emin + 1), e)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), (e - 1).clamp_min(emin) - MANT[dtype])


def assert_matches(actual, expected, norm, msg=""):
    """``actual`` (in delta's dtype) within one ulp of the float64 ``expected``, plus compute rounding."""
    dtype = actual.dtype
    if dtype == torch.float64:
        assert_close(actual, expected, dtype, msg=msg)
        return
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values"
    a, e = actual.double().cpu(), expected.double().cpu()
    tol = ulp(torch.maximum(a.abs(), e.abs()), dtype) + F32_ATOL + (4e-6 * e.abs() if norm == "l2" else 0.0)
    err = (a - e).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{msg}: {int(bad.sum())} of {a.numel()} elements off; worst {float((err - tol).max()):.3g} over "
        f"tolerance at {tuple(int(i) for i in torch.nonzero(bad)[0])}"
    )


def assert_bounds(delta, clean, eps, norm):
    """The step's guarantees: inside the eps-ball and clean + delta inside [0, 1]."""
    d, c = delta.double().cpu(), clean.double().cpu()
    slack = F32_ATOL if delta.dtype in (torch.float32, torch.float64) else F32_ATOL + float(ulp(torch.tensor(max(eps, 1e-3)), delta.dtype))
    if norm == "linf":
        assert d.abs().max() <= eps + slack, f"|delta|_inf = {float(d.abs().max())} > eps = {eps}"
    else:
        per = d.reshape(d.shape[0], -1)
        rel = 1e-6 if delta.dtype in (torch.float32, torch.float64) else 2.0 ** -MANT[delta.dtype]
        bound = eps * (1 + rel) + math.sqrt(per.shape[1]) * slack
        assert per.norm(dim=1).max() <= bound, f"max |delta_n|_2 = {float(per.norm(dim=1).max())} > {bound}"
    x = c + d
    assert x.min() >= -slack and x.max() <= 1 + slack, f"clean + delta in [{float(x.min())}, {float(x.max())}]"


def make_inputs(shape, gen, *, dtype=torch.float32, eps=8 / 255, norm="linf", grad_dtype=None, clean_dtype=None):
    """delta inside (and a little outside) the ball, grad with exact zeros, clean with 0s, 1s and near-edge values."""
    numel = math.prod(shape)
    if norm == "linf":
        delta = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps * 1.1
    else:
        delta = torch.randn(shape, generator=gen, dtype=torch.float64)
        delta = delta / delta.reshape(shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (len(shape) - 1)) * eps
        delta = delta * (0.5 + torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen, dtype=torch.float64))
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad[torch.rand(shape, generator=gen) < 0.2] = 0.0  # sign(0) = 0: these must not move
    clean = torch.rand(numel, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, 6, (numel,), generator=gen)
    clean[pick == 0] = 0.0
    clean[pick == 1] = 1.0
    clean[pick == 2] = 1.0 - 1e-3 * torch.rand(int((pick == 2).sum()), generator=gen, dtype=torch.float64)
    clean[pick == 3] = 1e-3 * torch.rand(int((pick == 3).sum()), generator=gen, dtype=torch.float64)
    return (delta.to(dtype), grad.to(grad_dtype or dtype), clean.reshape(shape).to(clean_dtype or torch.float32))


def run(backend, device, delta, grad, clean, **kw):
    """Run ``pgd_step_`` on copies moved to ``device``; return (result on device, the oracle)."""
    mask = kw.pop("mask", None)
    d, g, c = delta.clone().to(device), grad.to(device), clean.to(device)
    m = mask.to(device) if mask is not None else None
    expected = oracle(delta, grad, clean, kw["eps"], kw["step_size"], kw.get("norm", "linf"), kw.get("maximize", False), mask)
    out = pgd_step_(d, g, c, mask=m, backend=backend, **kw)
    assert out is d
    return d, expected


def dev(backend, triton_device):
    return triton_device if backend == "triton" else ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- against the oracle

SHAPES = [(1, 3, 4, 4), (2, 3, 5, 7), (5, 1, 3, 3), (3, 7), (4,), (127, 3, 5, 5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_oracle(backend, norm, shape, maximize, gen, triton_device):
    eps, step = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.2)
    delta, grad, clean = make_inputs(shape, gen, eps=eps, norm=norm)
    if norm == "l2" and shape[0] > 1:
        grad[1] = 0.0  # a zero-gradient sample: only projected and clipped
    d, expected = run(backend, dev(backend, triton_device), delta, grad, clean,
                      eps=eps, step_size=step, norm=norm, maximize=maximize)
    assert_matches(d, expected, norm, f"{backend} {norm} {shape}")
    assert_bounds(d, clean, eps, norm)


MASK_SHAPES = [  # over delta [3, 2, 5, 6]; the comment says how many dims the kernel sees
    (3, 1, 5, 6),  # 3
    (1, 2, 5, 6),  # 2
    (3, 2, 5, 6),  # 1
    (3, 1, 1, 1),  # 2
    (5, 6),  # 2
    (3, 1, 5, 1),  # 4
    (),  # 1, stride 0
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("mshape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(backend, norm, mshape, kind, gen, triton_device):
    shape = (3, 2, 5, 6)
    eps, step = (8 / 255, 4 / 255) if norm == "linf" else (0.5, 0.3)
    delta, grad, clean = make_inputs(shape, gen, eps=eps, norm=norm)
    r = torch.rand(mshape, generator=gen)
    mask = r > 0.4 if kind == "bool" else torch.where(r > 0.3, r, torch.zeros(()))
    d, expected = run(backend, dev(backend, triton_device), delta, grad, clean,
                      eps=eps, step_size=step, norm=norm, mask=mask)
    assert_matches(d, expected, norm, f"{backend} {norm} mask {mshape} {kind}")
    assert_bounds(d, clean, eps, norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_layouts(backend, gen, triton_device):
    """A transposed (non-contiguous) mask, and a 6-D mask whose layout needs > 4 dims (copied)."""
    device = dev(backend, triton_device)
    for shape, mask in [
        ((4, 3, 6, 5), torch.rand(4, 1, 5, 6, generator=gen).transpose(2, 3) > 0.5),
        ((2, 3, 2, 3, 2, 3), torch.rand(2, 1, 2, 1, 2, 1, generator=gen) > 0.5),
    ]:
        for norm in ("linf", "l2"):
            delta, grad, clean = make_inputs(shape, gen, norm=norm, eps=0.3)
            d, expected = run(backend, device, delta, grad, clean, eps=0.3, step_size=0.1, norm=norm, mask=mask)
            assert_matches(d, expected, norm, f"{backend} {norm} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, norm, dtype, gen, triton_device):
    eps, step = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.2)
    others = {torch.float32: torch.bfloat16, torch.float16: torch.float32, torch.bfloat16: torch.float16,
              torch.float64: torch.float64}[dtype]  # grad and clean in another dtype than delta
    delta, grad, clean = make_inputs((6, 3, 4, 5), gen, dtype=dtype, eps=eps, norm=norm,
                                     grad_dtype=others, clean_dtype=others)
    mask = torch.rand(6, 1, 4, 5, generator=gen) > 0.3
    d, expected = run(backend, dev(backend, triton_device), delta, grad, clean,
                      eps=eps, step_size=step, norm=norm, mask=mask)
    assert d.dtype == dtype
    assert_matches(d, expected, norm, f"{backend} {norm} {dtype}")
    assert_bounds(d, clean, eps, norm)


def test_linf_backends_agree_bitwise(gen, triton_device):
    """Same float32 operations in the same order: identical results (1 ulp of 1 with a fractional mask)."""
    shape = (7, 3, 9, 11)
    delta, grad, clean = make_inputs(shape, gen)
    for mask, atol in [(None, 0.0), (torch.rand(7, 1, 9, 11, generator=gen) > 0.5, 0.0),
                       (torch.rand(1, 3, 9, 11, generator=gen), 2.0**-23)]:
        out = []
        for backend in BACKENDS:
            d = delta.clone().to(dev(backend, triton_device))
            m = None if mask is None else mask.to(d.device)
            pgd_step_(d, grad.to(d.device), clean.to(d.device), eps=8 / 255, step_size=2 / 255, mask=m, backend=backend)
            out.append(d.cpu())
        assert (out[0] - out[1]).abs().max() <= atol


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, gen, triton_device):
    device = dev(backend, triton_device)
    shape = (4, 3, 5, 5)
    # eps = 0: nothing survives, whatever the step.
    delta, grad, clean = make_inputs(shape, gen)
    for norm in ("linf", "l2"):
        d = delta.clone().to(device)
        pgd_step_(d, grad.to(device), clean.to(device), eps=0.0, step_size=0.1, norm=norm, backend=backend)
        assert (d == 0).all()
    # Step larger than eps: every pixel with a gradient and room in [0, 1] ends on the boundary.
    clean = torch.full(shape, 0.5)
    d, expected = run(backend, device, delta, grad, clean, eps=8 / 255, step_size=1.0)
    assert_matches(d, expected, "linf", "step > eps")
    moved = grad != 0
    assert torch.allclose(d[moved].abs().cpu(), torch.full((int(moved.sum()),), 8 / 255))
    assert torch.equal(d[moved].sign().cpu(), -grad[moved].sign())
    # Zero gradient: L-inf only clips, L2 only projects.
    zero = torch.zeros(shape)
    clean = torch.rand(shape, generator=gen)
    for norm, eps in (("linf", 8 / 255), ("l2", 0.2)):
        d, expected = run(backend, device, delta, zero, clean, eps=eps, step_size=0.5, norm=norm)
        assert_matches(d, expected, norm, f"zero grad {norm}")
    # Pixel clip binding: clean at 0 and 1, step pushing outwards.
    clean = (torch.rand(shape, generator=gen) > 0.5).float()
    grad = torch.where(clean > 0, -1.0, 1.0)
    d, _ = run(backend, device, torch.zeros(shape), grad, clean, eps=0.1, step_size=0.05)
    assert (d == 0).all()
    # A float64 gradient too small for float32 still has a sign.
    d, _ = run(backend, device, torch.zeros(shape), torch.full(shape, -1e-60, dtype=torch.float64),
               torch.full(shape, 0.5), eps=0.1, step_size=0.05)
    assert torch.allclose(d.cpu(), torch.full(shape, 0.05))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_non_contiguous(backend, norm, gen, triton_device):
    """delta as a transposed view (and strided grad/clean): the base tensor is updated in place."""
    device = dev(backend, triton_device)
    base = make_inputs((5, 4, 3, 6), gen, eps=0.3, norm="linf")[0].to(device)
    delta = base.transpose(1, 3)[:, ::2]  # [5, 3, 3, 4], strided
    assert not delta.is_contiguous()
    _, grad, clean = make_inputs(tuple(delta.shape), gen, norm=norm)
    grad = grad.to(device).transpose(2, 3).contiguous().transpose(2, 3)
    expected = oracle(delta.cpu(), grad.cpu(), clean, 0.3, 0.1, norm)
    before = base.clone()
    out = pgd_step_(delta, grad, clean.to(device), eps=0.3, step_size=0.1, norm=norm, backend=backend)
    assert out is delta
    assert_matches(base.transpose(1, 3)[:, ::2], expected, norm, "through the base")
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched.transpose(1, 3)[:, ::2] = False
    assert torch.equal(base[untouched], before[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leaf_requiring_grad(backend, gen, triton_device):
    """Like an optimizer step: a leaf delta that requires grad is updated, stays a leaf."""
    device = dev(backend, triton_device)
    delta, grad, clean = make_inputs((2, 3, 4, 4), gen)
    d = delta.clone().to(device).requires_grad_()
    pgd_step_(d, grad.to(device), clean.to(device), eps=8 / 255, step_size=1 / 255, backend=backend)
    assert d.requires_grad and d.is_leaf and d.grad_fn is None
    assert_matches(d.detach(), oracle(delta, grad, clean, 8 / 255, 1 / 255, "linf"), "linf")


def test_reference_is_public(gen):
    delta, grad, clean = make_inputs((3, 2, 4, 4), gen, norm="l2", eps=0.5)
    d = delta.clone()
    assert pgd_step_ref_(d, grad, clean, eps=0.5, step_size=0.2, norm="l2", maximize=True) is d
    assert_matches(d, oracle(delta, grad, clean, 0.5, 0.2, "l2", True), "l2")


def test_bad_inputs():
    x = torch.zeros(2, 3)
    ok = dict(eps=0.1, step_size=0.01)
    cases = [
        (TypeError, lambda: pgd_step_(x.numpy(), x, x, **ok)),
        (TypeError, lambda: pgd_step_(x.long(), x, x, **ok)),
        (TypeError, lambda: pgd_step_(x, x.int(), x, **ok)),
        (ValueError, lambda: pgd_step_(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), **ok)),
        (ValueError, lambda: pgd_step_(torch.zeros(()), torch.zeros(()), torch.zeros(()), **ok)),
        (ValueError, lambda: pgd_step_(x, torch.zeros(3, 2), x, **ok)),
        (ValueError, lambda: pgd_step_(x, x, torch.zeros(2, 3, 1), **ok)),
        (ValueError, lambda: pgd_step_(x, torch.zeros(2, 3, device="meta"), x, **ok)),
        (ValueError, lambda: pgd_step_(x, x, x, norm="l1", **ok)),
        (ValueError, lambda: pgd_step_(x, x, x, eps=-0.1, step_size=0.01)),
        (ValueError, lambda: pgd_step_(x, x, x, eps=0.1, step_size=float("nan"))),
        (TypeError, lambda: pgd_step_(x, x, x, eps="0.1", step_size=0.01)),
        (ValueError, lambda: pgd_step_(x, x, x, mask=torch.ones(3, 3, dtype=torch.bool), **ok)),
        (ValueError, lambda: pgd_step_(x, x, x, mask=torch.ones(2, 2, 3, dtype=torch.bool), **ok)),
        (TypeError, lambda: pgd_step_(x, x, x, mask=[1, 0], **ok)),
        (ValueError, lambda: pgd_step_(torch.zeros(1, 3).expand(2, 3), x, x, **ok)),
        (ValueError, lambda: pgd_step_(x, x, x, backend="nope", **ok)),
        (ValueError, lambda: pgd_step_(x, x, x, backend="cuda", **ok)),
    ]
    for i, (exc, call) in enumerate(cases):
        with pytest.raises(exc):
            call()
            pytest.fail(f"case {i} did not raise")
    with pytest.raises(ValueError, match="l1"):
        pgd_step_(x, x, x, norm="l1", **ok)


# ----------------------------------------------------------------------------- GPU, realistic sizes


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(512, 3, 32, 32), (64, 3, 224, 224)], ids=str)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_triton_vs_torch(shape, norm, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    eps, step = (8 / 255, 0.8 / 255) if norm == "linf" else (0.5, 0.1)
    clean = torch.rand(shape, device="cuda", generator=gen)
    scale = eps if norm == "linf" else eps / math.sqrt(math.prod(shape[1:]))
    delta = ((torch.rand(shape, device="cuda", generator=gen) * 2 - 1) * scale).to(dtype)
    grad = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    mask = torch.rand((shape[0], 1) + shape[2:], device="cuda", generator=gen) > 0.5
    for m in (None, mask):
        a, b = delta.clone(), delta.clone()
        pgd_step_(a, grad, clean, eps=eps, step_size=step, norm=norm, mask=m, backend="triton")
        pgd_step_(b, grad, clean, eps=eps, step_size=step, norm=norm, mask=m, backend="torch")
        if norm == "linf" and dtype == torch.float32:
            assert torch.equal(a, b)
        else:
            assert_matches(a, b.double(), norm, f"gpu {shape} {norm}")
        assert_bounds(a, clean, eps, norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_for_the_miue_authors_update(backend, triton_device, gen):
    """The drop-in of docs/backend.md: in the MI-UE authors' gen_miue.py the update after ``loss.backward()``
    is a sign step, ``delta.grad = None``, the L-inf clamp and the pixel-range clamp;
    ``pgd_step_(delta.data, delta.grad, data, eps=eps, step_size=alpha)`` then ``delta.grad = None``
    gives the same float32 values bit for bit."""
    device = dev(backend, triton_device)
    data = torch.rand(32, 3, 8, 8, generator=gen).to(device)
    start = ((torch.rand(32, 3, 8, 8, generator=gen) * 2 - 1) * 8 / 255).to(device)
    grad = torch.randn(32, 3, 8, 8, generator=gen).to(device)
    grad[0, 0, 0] = 0.0  # sign(0) = 0
    data[1] = 1.0  # the pixel-range clamp bites
    eps, alpha = 8 / 255, 0.4 / 255
    theirs = torch.nn.Parameter(start.clone())
    theirs.grad = grad.clone()
    theirs.data = theirs.data - alpha * theirs.grad.sign()
    theirs.grad = None
    theirs.data = torch.clamp(theirs.data, min=-eps, max=eps)
    theirs.data = torch.clamp(data + theirs.data, min=0, max=1) - data
    ours = torch.nn.Parameter(start.clone())
    ours.grad = grad.clone()
    pgd_step_(ours.data, ours.grad, data, eps=eps, step_size=alpha, backend=backend)
    ours.grad = None
    assert torch.equal(ours.data, theirs.data)
