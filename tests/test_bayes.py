"""The kernel Bayes-error estimate (``ue_fast.ops.bayes``) against a float64 reference built
by the definition with explicit [B, B, D] broadcasting, forward and gradient."""
import math

import pytest
import torch

from ue_fast.ops import bayes as bayes_mod
from ue_fast.ops.bayes import bayes_error, bayes_error_ref, loo_kernel_posterior


def _reference(f: torch.Tensor, y: torch.Tensor, num_classes: int, sigma: float):
    """(posterior [B, C], E) in float64 by the definition, with a [B, B, D] difference tensor."""
    f = f.double()
    b = len(f)
    k = torch.exp(-((f[:, None, :] - f[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2))
    k = k * (1 - torch.eye(b, dtype=f.dtype))
    p = torch.stack([(k * (y[None, :] == c)).sum(1) for c in range(num_classes)], 1) / k.sum(1, keepdim=True)
    c = p.argmax(1)
    return p, (1 - p.gather(1, c[:, None])[:, 0]).mean()


def _inputs(gen, b, d, c, dtype, duplicates=False):
    f = torch.randn(b, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=gen)
    if c > 1 and b > 2:
        y[y == c - 1] = 0
        y[0] = c - 1  # class c-1 has exactly one sample
    if duplicates and b >= 4:
        f[1] = f[0]  # same features, different classes
        y[1] = (y[0] + 1) % c
        f[3] = f[2]  # same features, same class
        y[3] = y[2]
    sigma = float(torch.empty(()).uniform_(0.5, 2.0, generator=gen)) * math.sqrt(d)
    return f.to(dtype), y, sigma


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b, d, c, duplicates", [
    (2, 3, 2, False), (5, 1, 3, False), (17, 7, 4, True), (64, 16, 10, True), (127, 32, 5, False),
])
def test_bayes_error_matches_reference(gen, dtype, b, d, c, duplicates):
    f, y, sigma = _inputs(gen, b, d, c, dtype, duplicates)
    rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else (1e-4, 1e-6)
    f_ref = f.double().clone().requires_grad_(True)
    p_ref, e_ref = _reference(f_ref, y, c, sigma)
    e_ref.backward()
    x = f.clone().requires_grad_(True)
    e = bayes_error(x, y, c, sigma)
    e.backward()
    assert e.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loo_kernel_posterior(f, y, c, sigma).double(), p_ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(e.double(), e_ref.detach(), rtol=rtol, atol=atol)
    scale = f_ref.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), f_ref.grad, rtol=rtol, atol=atol * max(scale, 1.0))


def test_bayes_error_row_blocks_match_reference(gen, monkeypatch):
    monkeypatch.setattr(bayes_mod, "_CHUNK_ELEMS", 37 * 5)  # blocks of 5 rows, the last one of 2
    f, y, sigma = _inputs(gen, 37, 6, 4, torch.float64, duplicates=True)
    f_ref = f.clone().requires_grad_(True)
    p_ref, e_ref = _reference(f_ref, y, 4, sigma)
    e_ref.backward()
    x = f.clone().requires_grad_(True)
    bayes_error(x, y, 4, sigma).backward()
    torch.testing.assert_close(loo_kernel_posterior(f, y, 4, sigma), p_ref.detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(x.grad, f_ref.grad, rtol=1e-9, atol=1e-11)


def test_bayes_error_far_apart_features_is_nearest_neighbour(gen):
    # exp(-d / 2 sigma^2) underflows to 0 for every pair: the definition's 0/0 becomes the
    # nearest neighbour's class, finite, with the max subtracted before exp.
    f, y, _ = _inputs(gen, 20, 8, 3, torch.float32)
    p = loo_kernel_posterior(f, y, 3, 1e-3)
    d = torch.cdist(f.double(), f.double()) + torch.eye(20) * 1e9
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.argmax(1), y[d.argmin(1)])
    assert float(bayes_error(f, y, 3, 1e-3)) == pytest.approx(0.0, abs=1e-6)


def test_bayes_error_validates_inputs():
    f, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="at least 2"):
        bayes_error(f[:1], y[:1], 2, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 2\), found 2"):
        bayes_error(f, torch.tensor([0, 1, 2, 1]), 2, 1.0)
    with pytest.raises(ValueError, match="sigma must be > 0, got -1"):
        bayes_error(f, y, 2, -1.0)
    with pytest.raises(TypeError, match="floating-point"):
        bayes_error(f.long(), y, 2, 1.0)
    with pytest.raises(TypeError, match="integer"):
        bayes_error(f, y.float(), 2, 1.0)


def test_median_bandwidth_subsamples_large_sets(gen, monkeypatch):
    f = torch.rand(25, 4, generator=gen)
    monkeypatch.setattr(bayes_mod, "_MEDIAN_ROWS", 10)  # 25 rows -> every 3rd: rows 0, 3, ..., 24
    g = f[::3].double()
    d2 = ((g[:, None] - g[None]) ** 2).sum(-1)
    med = d2[torch.triu(torch.ones(len(g), len(g), dtype=torch.bool), 1)].median()
    assert bayes_mod.median_bandwidth(f) == pytest.approx(math.sqrt(med / 2), rel=1e-5)


def test_autograd_reference_matches_the_op(gen):
    f, y, sigma = _inputs(gen, 33, 5, 4, torch.float64, duplicates=True)
    a, b = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
    bayes_error(a, y, 4, sigma).backward()
    bayes_error_ref(b, y, 4, sigma).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11)


def test_validate_false_skips_the_checks_only(gen):
    f, y, sigma = _inputs(gen, 12, 3, 3, torch.float32)
    assert float(bayes_error(f, y, 3, sigma, validate=False)) == float(bayes_error(f, y, 3, sigma))
