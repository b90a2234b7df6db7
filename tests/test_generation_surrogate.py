"""The surrogate block (``ue_fast.generation.surrogate``)."""
import pytest
import torch

from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import Batches, RunContext, Surrogate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return read_image_folder(demo_subset(tmp_path_factory.mktemp("in"), per_class=8), progress=False)


def _surrogate(seed=0, **kw):
    return Surrogate(RunContext("cpu", progress=False), "cnn-small", 3, 32, seed=seed, lr=0.1, momentum=0.9,
                     weight_decay=0.0, **kw)


def _clean(b):
    return lambda idx: (b.clean(idx), b.labels[idx])


def test_fit_learns_and_reports(data):
    b = Batches(data.images, data.labels, CPU, CPU, 0)
    s = _surrogate()
    first = s.fit(b.shuffled(8), _clean(b), lr=0.05)
    for _ in range(12):
        last = s.fit(b.shuffled(8), _clean(b), lr=0.05)
    assert last["train_loss"] < first["train_loss"] and last["train_acc"] > 0.6 and last["train_s"] > 0
    assert s.optimizer.param_groups[0]["lr"] == 0.05 and s.model.training
    acc = s.accuracy(b.ordered(10), _clean(b))  # eval mode, batch by batch
    with torch.no_grad():
        direct = float((s.model.eval()(b.clean(torch.arange(b.n)))[1].argmax(1) == b.labels).float().mean())
    assert acc == pytest.approx(direct)


def test_fit_clips_the_gradient_norm(data, monkeypatch):
    b = Batches(data.images, data.labels, CPU, CPU, 0)
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        total = real(params, max_norm, *a, **k)
        params = [p for p in s.model.parameters() if p.grad is not None]
        norms.append((float(total), float(torch.cat([p.grad.flatten() for p in params]).norm())))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    s = _surrogate()
    s.fit(b.shuffled(8), _clean(b), lr=0.1, clip_grad_norm=1e-3)
    assert len(norms) == 3 and all(after <= 1e-3 * 1.001 < before for before, after in norms)


def test_same_seed_same_weights_and_reinit(data):
    a, b = _surrogate(seed=3), _surrogate(seed=3)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    batches = Batches(data.images, data.labels, CPU, CPU, 0)
    a.fit(batches.shuffled(12), _clean(batches), lr=0.1)
    assert a.optimizer.state  # momentum from training
    rng = torch.get_rng_state()
    a.reinit(11)
    b.reinit(11)
    assert torch.equal(torch.get_rng_state(), rng), "reinit must leave the global generator alone"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert a.optimizer.state == {} and all(torch.equal(sa[k], sb[k]) for k in sa)
    b.reinit(12)  # another seed draws other weights
    assert not torch.equal(sa["classifier.weight"], b.model.state_dict()["classifier.weight"])


def test_frozen_restores_mode_and_flags():
    s = _surrogate()
    s.model.train()
    with s.frozen():
        assert not s.model.training and not any(p.requires_grad for p in s.model.parameters())
    assert s.model.training and all(p.requires_grad for p in s.model.parameters())


def test_nesterov_and_state_round_trip(data):
    s = _surrogate(nesterov=True)
    assert s.optimizer.param_groups[0]["nesterov"] is True
    b = Batches(data.images, data.labels, CPU, CPU, 0)
    s.fit(b.shuffled(12), _clean(b), lr=0.1)
    t = _surrogate(seed=5, nesterov=True)
    t.load_state_dict(s.state_dict())
    x = b.clean(torch.arange(4))
    s.model.eval(), t.model.eval()
    assert torch.equal(s.forward(x)[1], t.forward(x)[1])


def test_float64_computes_in_double_and_refuses_autocast(data):
    """``float64``: the images, the network and its losses in double precision, the same
    weights (drawn in float32, then widened) and the same training as float32 to its rounding."""
    ctx64 = RunContext("cpu", progress=False, float64=True)
    b64 = Batches(data.images, data.labels, CPU, CPU, 0, dtype=ctx64.dtype)
    s64 = Surrogate(ctx64, "cnn-small", 3, 32, seed=0, lr=0.1, momentum=0.9, weight_decay=0.0)
    s32 = _surrogate()
    assert all(p.dtype == torch.float64 for p in s64.model.parameters())
    assert all(torch.equal(p.float(), q) for p, q in zip(s64.model.parameters(), s32.model.parameters()))
    assert b64.clean(torch.arange(4)).dtype == torch.float64
    b32 = Batches(data.images, data.labels, CPU, CPU, 0)
    r64 = s64.fit(b64.shuffled(8)[:3], _clean(b64), lr=0.05)
    r32 = s32.fit(b32.shuffled(8)[:3], _clean(b32), lr=0.05)
    assert r64["train_loss"] == pytest.approx(r32["train_loss"], rel=1e-4) and r64["train_loss"] != r32["train_loss"]
    with pytest.raises(ValueError, match="autocast"):
        RunContext("cpu", amp=True, float64=True)


def test_a_transformer_surrogate_takes_adamw_with_the_methods_schedule_scaled(data):
    """SGD at the methods' rates does not train a ViT: its surrogate runs AdamW (weight decay
    0.05) at the method's learning rates x 1e-3 / the method's base lr, and learns."""
    b = Batches(data.images[:12], data.labels[:12], CPU, CPU, 0)
    s = Surrogate(RunContext("cpu", progress=False), "vit-small", 3, 32, seed=0, lr=0.1, momentum=0.9,
                  weight_decay=5e-4)
    assert isinstance(s.optimizer, torch.optim.AdamW) and s.optimizer.param_groups[0]["weight_decay"] == 0.05
    first = s.fit(b.shuffled(6), _clean(b), lr=0.05)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 1e-3 / 0.1)
    for _ in range(8):
        last = s.fit(b.shuffled(6), _clean(b), lr=0.1)
    assert last["train_loss"] < 0.3 * first["train_loss"] and last["train_acc"] == 1, (first, last)
    s.reinit(1)
    assert not s.optimizer.state
