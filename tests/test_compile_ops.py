"""The ops as torch.library ops: torch.compile(fullgraph=True) traces a PGD step with no graph
break and matches eager; opcheck on every op; the Triton backend goes through the same
registration (under the interpreter on the CPU)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TOL
from ue_fast.ops import centroid_loss, pgd_step_, supcon_loss

OPS = torch.ops.ue_fast
C = 4
STEP_SIZES = (2 / 255, 1 / 255, 0.5 / 255, 1.5 / 255)  # a decaying schedule, as MI-UE's


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """A clean compile cache per test; torch.autograd.grad traced inside the compiled step."""
    monkeypatch.delenv("UE_FAST_BACKEND", raising=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def make_problem(gen, dtype=torch.float32, B=12, device="cpu"):
    """Clean images x [B, 3, 4, 4] in [0, 1], labels [B] with every class present, a tiny conv net."""
    x = torch.rand(B, 3, 4, 4, generator=gen, dtype=dtype)
    y = torch.arange(B) % C
    y = y[torch.randperm(B, generator=gen)]
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(64, 8)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    net.requires_grad_(False)  # a frozen surrogate, as during generation
    return x.to(device), y.to(device), net.to(device)


def make_step(net, y, backend, norm="linf", mask=None):
    """One PGD step on the leaf ``delta`` (updated in place); returns the loss before the step."""

    def step(delta, x, alpha):
        feats = net(x + delta)
        loss = supcon_loss(feats, y, 0.1, backend=backend) + centroid_loss(feats, y, C, 0.5, backend=backend)
        (grad,) = torch.autograd.grad(loss, delta)
        pgd_step_(delta, grad, x, eps=8 / 255, step_size=alpha, norm=norm, mask=mask, backend=backend)
        return loss.detach()

    return step


def run_steps(step, x, dtype):
    delta = torch.zeros_like(x, dtype=dtype).requires_grad_()
    losses = [step(delta, x, alpha) for alpha in STEP_SIZES]
    return delta.detach(), torch.stack(losses)


def check_compiled_matches_eager(gen, dtype, backend, compile_backend, norm="linf", mask=None, device="cpu"):
    x, y, net = make_problem(gen, dtype, device=device)
    want_delta, want_loss = run_steps(make_step(net, y, backend, norm, mask), x, dtype)
    # fullgraph=True raises on any graph break. From the second step size on, dynamo traces
    # the step size as a symbolic float (then specialises it at the op's float argument).
    compiled = torch.compile(make_step(net, y, backend, norm, mask), fullgraph=True, backend=compile_backend)
    got_delta, got_loss = run_steps(compiled, x, dtype)
    assert want_delta.abs().max() > 0  # the steps did move delta
    torch.testing.assert_close(got_loss, want_loss, **TOL[dtype])
    torch.testing.assert_close(got_delta, want_delta, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_step_compiles_fullgraph_torch_backend(dtype, gen):
    check_compiled_matches_eager(gen, dtype, "torch", "aot_eager")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_compiles_with_mask(norm, gen):
    mask = (torch.rand(1, 1, 4, 4, generator=gen) > 0.3)
    check_compiled_matches_eager(gen, torch.float64, "torch", "aot_eager", norm=norm, mask=mask)


@pytest.mark.slow
def test_pgd_step_compiles_with_inductor(gen):
    # float64: Inductor's fused elementwise code rounds differently, and a gradient element
    # within float32 rounding of 0 would flip its sign (a 2 * step difference in delta).
    check_compiled_matches_eager(gen, torch.float64, "torch", "inductor")


def test_pgd_step_compiles_triton_backend(gen, triton_device):
    """The Triton kernels run inside the ops (the interpreter on the CPU), opaque to the tracer."""
    compile_backend = "inductor" if triton_device == "cuda" else "aot_eager"
    check_compiled_matches_eager(gen, torch.float64, "triton", compile_backend, device=triton_device)


def test_compiled_step_on_a_non_contiguous_view(gen):
    """delta a strided view of a bigger buffer: the compiled step writes through to the base."""
    x, y, net = make_problem(gen, torch.float64)

    def step(delta, x, alpha):
        leaf = delta.detach().requires_grad_()
        feats = net(x + leaf)
        loss = supcon_loss(feats, y, backend="torch") + centroid_loss(feats, y, C, backend="torch")
        (grad,) = torch.autograd.grad(loss, leaf)
        return pgd_step_(delta, grad, x, eps=8 / 255, step_size=alpha, backend="torch")

    bases = [torch.zeros(12, 3, 4, 8, dtype=torch.float64) for _ in range(2)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for alpha in STEP_SIZES[:2]:
        step(bases[0][..., ::2], x, alpha)
        out = compiled(bases[1][..., ::2], x, alpha)
    assert out.data_ptr() == bases[1].data_ptr() and out.stride() == bases[1][..., ::2].stride()
    assert bases[0].abs().max() > 0 and (bases[1][..., 1::2] == 0).all()
    torch.testing.assert_close(bases[1], bases[0], **TOL[torch.float64])


def test_compiled_label_range_is_still_checked(gen):
    """Tracing skips the host-side label range check; the class-count index_add still refuses."""
    f = torch.randn(6, 3, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 1, C])  # C is out of range
    with pytest.raises(ValueError, match=f"found {C}"):
        centroid_loss(f, y, C, backend="torch")
    compiled = torch.compile(lambda f, y: centroid_loss(f, y, C, backend="torch"), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises((RuntimeError, IndexError)):
        compiled(f, y)


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_compiled_step_size_is_still_checked(bad, gen):
    """Tracing leaves a step size that changed between calls unchecked (it is symbolic there);
    the op checks the value it runs with."""
    x, y, net = make_problem(gen, torch.float64)
    compiled = torch.compile(make_step(net, y, "torch"), fullgraph=True, backend="aot_eager")
    delta = torch.zeros_like(x).requires_grad_()
    for alpha in STEP_SIZES[:2]:
        compiled(delta, x, alpha)
    with pytest.raises(ValueError, match="step_size"):
        compiled(delta, x, bad)


# ----------------------------------------------------------------------------- opcheck


def _features(gen, B, D, dtype, transposed=False):
    if transposed:
        return torch.randn(D, B, generator=gen, dtype=dtype).t()
    return torch.randn(B, D, generator=gen, dtype=dtype)


def _backends(triton_device):
    return [("torch", "cpu"), ("triton", triton_device)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_supcon(dtype, gen, triton_device):
    for backend, dev in _backends(triton_device):
        for B, D, need_grad, transposed in [(9, 5, True, False), (1, 3, True, False), (7, 4, True, True),
                                            (5, 3, False, False)]:
            f = _features(gen, B, D, dtype, transposed).to(dev).requires_grad_(need_grad)
            y = torch.randint(0, 3, (B,), generator=gen).to(dev)
            torch.library.opcheck(OPS.supcon_loss.default, (f, y, 0.2, backend, need_grad))
        f = _features(gen, 9, 5, dtype).to(dev)
        y = torch.randint(0, 3, (9,), generator=gen).to(dev)
        _, saved = OPS.supcon_loss(f, y, 0.2, backend, True)
        g = torch.tensor(0.7, dtype=saved.dtype if backend == "triton" else f.dtype, device=dev)
        torch.library.opcheck(OPS.supcon_loss_backward.default, (g, f, y, saved, 0.2, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_centroid(dtype, gen, triton_device):
    for backend, dev in _backends(triton_device):
        for B, D, transposed in [(11, 6, False), (1, 1, False), (8, 3, True)]:
            f = _features(gen, B, D, dtype, transposed).to(dev).requires_grad_()
            y = torch.randint(0, C - 1, (B,), generator=gen).to(dev)  # class C-1 absent
            counts = torch.bincount(y, minlength=C)
            torch.library.opcheck(OPS.centroid_class_sums.default, (f, y, counts, backend))
        S, norms = OPS.centroid_class_sums(f.detach(), y, counts, backend)
        grad_sums = torch.randn(S.shape, generator=gen, dtype=S.dtype).to(dev)
        torch.library.opcheck(OPS.centroid_class_sums_backward.default, (grad_sums, f.detach(), y, norms, backend))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck_pgd_step(norm, gen, triton_device):
    for backend, dev in _backends(triton_device):
        for dtype, mask in [(torch.float32, None), (torch.float64, "bool"), (torch.float32, "float")]:
            x = torch.rand(3, 2, 4, 4, generator=gen, dtype=dtype).to(dev)
            delta = ((torch.rand(x.shape, generator=gen, dtype=dtype) - 0.5) * 0.05).to(dev)
            grad = torch.randn(x.shape, generator=gen, dtype=dtype).to(dev)
            m = None if mask is None else (torch.rand(3, 1, 4, 4, generator=gen) > 0.5).to(dev)
            if mask == "float":
                m = m.to(dtype) * 0.5
            torch.library.opcheck(OPS.pgd_step_.default, (delta, grad, x, m, 0.03, 0.01, norm, False, backend))


# ----------------------------------------------------------------------------- eager registration


class OpRecorder(TorchDispatchMode):
    """Records every op call that reaches the dispatcher's Python mode: (name, {argument: value})."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        names = [a.name for a in func._schema.arguments]
        self.calls.append((str(func.name()), dict(zip(names, args)) | (kwargs or {})))
        return func(*args, **(kwargs or {}))

    def args(self, name):
        return [a for n, a in self.calls if n == name]

    def backends(self, name):
        return [a["backend"] for a in self.args(name)]


def test_eager_triton_goes_through_the_registration(gen, triton_device, monkeypatch):
    """backend="triton" (the interpreter on the CPU) runs inside the ops, forward and backward."""
    from ue_fast.kernels import centroid as centroid_kernels, pgd as pgd_kernels, supcon as supcon_kernels

    launched = []
    for mod, name in [(supcon_kernels, "supcon_fwd"), (supcon_kernels, "supcon_bwd"),
                      (centroid_kernels, "class_sums_fwd"), (centroid_kernels, "class_sums_bwd"),
                      (pgd_kernels, "pgd_step")]:
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: launched.append(_name) or _real(*a, **k))

    f = torch.randn(10, 6, generator=gen).to(triton_device).requires_grad_()
    y = (torch.arange(10) % 3).to(triton_device)
    x = torch.rand(10, 6, generator=gen).to(triton_device)
    with OpRecorder() as rec:
        loss = supcon_loss(f, y, backend="triton") + centroid_loss(f, y, 3, backend="triton")
        (grad,) = torch.autograd.grad(loss, f)
        delta = torch.zeros_like(x)
        out = pgd_step_(delta, grad, x, eps=0.1, step_size=0.01, backend="triton")
    assert out is delta
    assert rec.backends("ue_fast::supcon_loss") == ["triton"]
    assert rec.backends("ue_fast::supcon_loss_backward") == ["triton"]
    assert rec.backends("ue_fast::centroid_class_sums") == ["triton"]
    assert rec.backends("ue_fast::centroid_class_sums_backward") == ["triton"]
    assert rec.backends("ue_fast::pgd_step_") == ["triton"]
    assert sorted(launched) == ["class_sums_bwd", "class_sums_fwd", "pgd_step", "supcon_bwd", "supcon_fwd"]

    # Same numbers as the torch backend behind the same ops.
    ft = f.detach().cpu().requires_grad_()
    want = supcon_loss(ft, y.cpu(), backend="torch") + centroid_loss(ft, y.cpu(), 3, backend="torch")
    (want_grad,) = torch.autograd.grad(want, ft)
    torch.testing.assert_close(loss.detach().cpu(), want.detach(), **TOL[torch.float32])
    torch.testing.assert_close(grad.cpu(), want_grad, **TOL[torch.float32])
    want_delta = pgd_step_(torch.zeros_like(x).cpu(), want_grad, x.cpu(), eps=0.1, step_size=0.01, backend="torch")
    assert want_delta.abs().max() > 0.005  # the step moved delta
    torch.testing.assert_close(delta.cpu(), want_delta, **TOL[torch.float32])


def test_forward_only_call_saves_nothing(gen):
    """Without a gradient wanted, the torch path does not build one (need_grad=False)."""
    f = torch.randn(6, 4, generator=gen)
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    with OpRecorder() as rec:
        loss = supcon_loss(f, y, backend="torch")
    (args,) = rec.args("ue_fast::supcon_loss")
    assert args["need_grad"] is False and not loss.requires_grad
    with pytest.raises(RuntimeError, match="need_grad=False"):
        fg = f.clone().requires_grad_()
        torch.autograd.grad(OPS.supcon_loss(fg, y, 0.1, "torch", False)[0], fg)


def test_double_backward_refuses(gen):
    """The backward ops are not differentiable: create_graph then backward raises, not a silent 0."""
    f = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    for loss in (supcon_loss(f, y, backend="torch"), centroid_loss(f, y, 3, backend="torch")):
        (g,) = torch.autograd.grad(loss, f, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            torch.autograd.grad(g.sum(), f)
