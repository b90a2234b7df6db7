"""supcon_loss against an independent float64 oracle, on every backend that runs here."""
import math

import pytest
import torch

import ue_fast
from ue_fast.ops.supcon import _supcon_torch
from conftest import TOL

BACKENDS = ["torch", "triton"]


def oracle(f, y, tau):
    """Straight from the definition, dense, float64 (DESIGN.md section 1)."""
    f = f.double()
    z = f / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(1e-8)
    s = z @ z.T / tau
    same = y[:, None] == y[None, :]
    pos = torch.where(same, torch.exp(s), torch.zeros_like(s)).sum(1)
    return -torch.log(pos / torch.exp(s).sum(1)).mean()


def make(gen, B, D, C, kind="clustered", dtype=torch.float32):
    y = torch.randint(0, C, (B,), generator=gen)
    f = torch.randn(B, D, generator=gen, dtype=torch.float64)
    if kind == "clustered":  # class structure, so gradients do not cancel to noise
        centers = torch.randn(C, D, generator=gen, dtype=torch.float64)
        f = f * 0.5 + centers[y]
    elif kind == "one_class":
        y = torch.zeros(B, dtype=torch.long)
    elif kind == "singleton":  # class C appears once, at a random position
        y[torch.randint(0, B, (1,), generator=gen)] = C
    elif kind == "duplicates":
        f[B // 2:] = f[: B - B // 2].clone()
        y[B // 2:] = y[: B - B // 2].clone()
    elif kind == "zeros":  # zero and tiny (clamped) feature vectors
        f[::3] = 0.0
        f[1::5] *= 1e-10
    return f.to(dtype), y


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def fp32_dense_error(f, y, tau, g0):
    """Relative gradient error of the plain dense float32 autograd formulation:
    how ill-conditioned this input is in float32 (clustered features make the
    gradient a small difference of large terms)."""
    f32 = f.detach().float().cpu().requires_grad_()
    z = f32 / torch.linalg.vector_norm(f32, dim=1, keepdim=True).clamp_min(1e-8)
    s = z @ z.T / tau
    same = y.cpu()[:, None] == y.cpu()[None, :]
    loss = (torch.logsumexp(s, 1) - torch.logsumexp(s.masked_fill(~same, float("-inf")), 1)).mean()
    (g,) = torch.autograd.grad(loss, f32)
    return rel_err(g, g0)


def check(f, y, tau, backend, device, rtol):
    """Loss within rtol; gradient within rtol, or within 4x the error of plain
    float32 autograd where the input is that ill-conditioned."""
    f = f.to(device)
    y = y.to(device)
    fr = f.detach().double().cpu().requires_grad_()
    l0 = oracle(fr, y.cpu(), tau)
    (g0,) = torch.autograd.grad(l0, fr)
    if f.dtype != torch.float64:
        rtol = max(rtol, 4 * fp32_dense_error(f, y, tau, g0))
    fx = f.detach().clone().requires_grad_()
    loss = ue_fast.supcon_loss(fx, y, tau, backend=backend)
    (g,) = torch.autograd.grad(loss, fx)
    assert loss.dtype == (torch.float64 if f.dtype == torch.float64 else torch.float32)
    assert g.dtype == f.dtype and g.shape == f.shape
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert abs(loss.item() - l0.item()) <= rtol * max(1.0, abs(l0.item())), (loss.item(), l0.item())
    if float(torch.linalg.vector_norm(g0)) > 1e-12:
        assert rel_err(g, g0) <= rtol, rel_err(g, g0)
    else:  # e.g. D = 1: the gradient vanishes; what is left is rounding of r_i (g_i - z_i (z_i . g_i))
        rmax = float(1 / torch.linalg.vector_norm(fr.detach(), dim=1).clamp_min(1e-8).min())
        assert float(g.abs().max()) <= 1e-6 * max(1.0, rmax)
    return loss, g


def _device(backend, triton_device):
    return triton_device if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,D,C,kind",
    [
        (1, 1, 1, "random"),
        (1, 512, 3, "random"),
        (2, 7, 2, "clustered"),
        (2, 1, 1, "one_class"),
        (127, 7, 5, "clustered"),
        (127, 1, 3, "random"),
        (127, 512, 10, "singleton"),
        (513, 7, 10, "clustered"),
        (513, 512, 10, "clustered"),
        (64, 33, 4, "one_class"),
        (65, 16, 4, "duplicates"),
        (70, 9, 3, "zeros"),
    ],
)
def test_matches_oracle_float32(gen, triton_device, backend, B, D, C, kind):
    f, y = make(gen, B, D, C, kind)
    check(f, y, 0.1, backend, _device(backend, triton_device), rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.01, 0.5, 2.0])
def test_temperatures(gen, triton_device, backend, tau):
    f, y = make(gen, 97, 24, 6)
    check(f, y, tau, backend, _device(backend, triton_device), rtol=5e-5 if tau < 0.05 else 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["random", "zeros"])
def test_float64(gen, triton_device, backend, kind):
    # "zeros": the norm clamp is active; the clamp must be 1e-8 in float64, not rounded to float32
    f, y = make(gen, 129, 40, 7, kind, dtype=torch.float64)
    check(f, y, 0.1, backend, _device(backend, triton_device), rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(gen, triton_device, backend, dtype):
    # The oracle sees the same rounded inputs; the error left is accumulation and
    # the rounding of the gradient to the input dtype. The gradient scales as
    # 1/|f|: small features keep it out of float16's subnormal range.
    f, y = make(gen, 100, 64, 5)
    f = (f * 0.01).to(dtype)
    check(f, y, 0.1, backend, _device(backend, triton_device), rtol=TOL[dtype]["rtol"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_label_forms(gen, triton_device, backend):
    dev = _device(backend, triton_device)
    base = torch.randn(48, 90, generator=gen)
    f = base.T[::2]  # [45, 48], strides (2, 90): not contiguous
    assert not f.is_contiguous()
    y = torch.randint(-3, 4, (45,), generator=gen, dtype=torch.int32) * 1_000_003  # labels are identifiers
    check(f, y, 0.1, backend, dev, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales(gen, triton_device, backend):
    dev = _device(backend, triton_device)
    f, y = make(gen, 33, 10, 3)
    f, y = f.to(dev).requires_grad_(), y.to(dev)
    (g1,) = torch.autograd.grad(ue_fast.supcon_loss(f, y, backend=backend), f)
    (g2,) = torch.autograd.grad(-2.5 * ue_fast.supcon_loss(f, y, backend=backend), f)
    assert rel_err(g2, -2.5 * g1) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only(gen, triton_device, backend):
    dev = _device(backend, triton_device)
    f, y = make(gen, 20, 5, 2)
    with torch.no_grad():
        loss = ue_fast.supcon_loss(f.to(dev), y.to(dev), backend=backend)
    assert not loss.requires_grad
    assert abs(float(loss) - float(oracle(f, y, 0.1))) < 1e-5


def test_loss_is_lower_for_clustered_features(gen):
    # The point of the loss: same-class features aligned score lower than random ones.
    y = torch.arange(10).repeat(10)
    centers = torch.randn(10, 32, generator=gen)
    aligned = centers[y] + 0.01 * torch.randn(100, 32, generator=gen)
    scattered = torch.randn(100, 32, generator=gen)
    assert ue_fast.supcon_loss(aligned, y) < 0.5 * ue_fast.supcon_loss(scattered, y)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_torch_chunking_is_exact(gen, chunk):
    f, y = make(gen, 64, 12, 4, dtype=torch.float64)
    l1, g1 = _supcon_torch(f, y, 0.1, chunk, True)  # (loss, dL/df)
    l2, g2 = _supcon_torch(f, y, 0.1, 64, True)
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_matches_authors_formulation(gen):
    """The authors' code adds 1e-8 to each exp term; the difference is below fp32 noise."""
    f, y = make(gen, 64, 16, 4)
    s = torch.nn.functional.cosine_similarity(f.double()[:, None], f.double()[None], dim=2)
    e = torch.exp(s / 0.1) + 1e-8
    authors = -torch.log(torch.where(y[:, None] == y[None], e, 0).sum(1) / e.sum(1)).mean()
    assert abs(float(ue_fast.supcon_loss(f, y)) - float(authors)) < 1e-5


@pytest.mark.parametrize(
    "args,err",
    [
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), math.inf), ValueError),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 0.0), ValueError),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), -0.1), ValueError),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), float("nan")), ValueError),
        ((torch.randn(4), torch.zeros(4, dtype=torch.long), 0.1), ValueError),
        ((torch.randn(2, 4, 3), torch.zeros(2, dtype=torch.long), 0.1), ValueError),
        ((torch.randn(0, 3), torch.zeros(0, dtype=torch.long), 0.1), ValueError),
        ((torch.randn(4, 0), torch.zeros(4, dtype=torch.long), 0.1), ValueError),
        ((torch.randn(4, 3), torch.zeros(5, dtype=torch.long), 0.1), ValueError),
        ((torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), 0.1), ValueError),
        ((torch.randn(4, 3), torch.zeros(4), 0.1), TypeError),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.bool), 0.1), TypeError),
        ((torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 0.1), TypeError),
        (([[1.0]], torch.zeros(1, dtype=torch.long), 0.1), TypeError),
        ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), "0.1"), TypeError),
    ],
)
def test_bad_inputs(args, err):
    with pytest.raises(err):
        ue_fast.supcon_loss(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [128, 512, 1024, 4099])
def test_gpu_triton_matches_torch(B):
    g = torch.Generator().manual_seed(B)
    f, y = make(g, B, 512, 10)
    check(f, y, 0.1, "triton", "cuda", rtol=2e-5)
    fb, yb = make(g, B, 512, 10, dtype=torch.bfloat16)
    check(fb, yb, 0.1, "triton", "cuda", rtol=TOL[torch.bfloat16]["rtol"])


def test_auto_on_cpu_never_picks_the_interpreter(monkeypatch):
    from ue_fast.ops._dispatch import resolve

    monkeypatch.delenv("UE_FAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("supcon_loss", "auto", torch.device("cpu"), ("triton", "torch")) == "torch"
    assert resolve("supcon_loss", "triton", torch.device("cpu"), ("triton", "torch")) == "triton"
    monkeypatch.setenv("UE_FAST_BACKEND", "triton")
    assert resolve("supcon_loss", "auto", torch.device("cpu"), ("triton", "torch")) == "triton"
