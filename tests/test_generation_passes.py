"""PGD passes (``ue_fast.generation.passes``) on a small surrogate and real images: budget and
pixel range, descent and ascent, masks, starts, the class-wise sum, the whole-set equivalence."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import PGD, Batches, PerturbationStore, RunContext, Surrogate
from ue_fast.generation.passes import AdamW

EPS = 8 / 255


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return read_image_folder(demo_subset(tmp_path_factory.mktemp("in"), per_class=8), progress=False)


def _blocks(data, classwise=False, seed=0):
    ctx = RunContext("cpu", progress=False)
    cpu = torch.device("cpu")
    b = Batches(data.images, data.labels, cpu, cpu, seed)
    rows = 3 if classwise else len(data.labels)
    store = PerturbationStore(rows, data.images.shape[1:], device=cpu, place=cpu, dtype=torch.float32, eps=EPS,
                              seed=seed, row_of=b.labels if classwise else None)
    s = Surrogate(ctx, "cnn-small", 3, 32, seed=seed, lr=0.05, momentum=0.9, weight_decay=0.0)
    s.fit(b.shuffled(8), lambda idx: (b.clean(idx), b.labels[idx]), lr=0.05)
    return PGD(ctx, s, b, store, EPS), b, store


def ce(features, logits, y):
    return F.cross_entropy(logits.float(), y)


def _ce_now(pgd, b, store):
    with torch.no_grad(), pgd.surrogate.frozen():
        x = b.clean(torch.arange(b.n))
        return float(F.cross_entropy(pgd.surrogate.forward(x + store.samples(torch.arange(b.n)))[1], b.labels))


@pytest.mark.parametrize("maximize", [False, True])
def test_per_batch_moves_the_loss_within_budget_and_range(data, maximize):
    pgd, b, store = _blocks(data)
    before = _ce_now(pgd, b, store)
    out = pgd.per_batch(b.shuffled(16), ce, steps=3, step_size=2 / 255, maximize=maximize)
    after = _ce_now(pgd, b, store)
    assert (after > before + 0.05) if maximize else (after < before - 0.05), (before, after)
    d, x = store.delta, data.images.float() / 255
    assert float(d.abs().max()) <= EPS + 1e-6 and float((x + d).min()) >= -1e-6 and float((x + d).max()) <= 1 + 1e-6
    assert out["poison_loss"] > 0 and out["poison_s"] > 0 and store.passes == 1
    assert pgd.surrogate.model.training and all(p.requires_grad for p in pgd.surrogate.model.parameters())


def test_mask_restricts_the_moving_pixels(data):
    pgd, b, store = _blocks(data)
    mask = torch.zeros(b.n, 1, 32, 32, dtype=torch.bool)
    mask[:, :, :8] = True
    pgd.mask_source = lambda: mask
    pgd.per_batch(b.ordered(16), ce, steps=2, step_size=2 / 255)
    assert pgd.mask is mask
    assert store.delta[:, :, 8:].abs().sum() == 0 and store.delta[:, :, :8].abs().sum() > 0


@pytest.mark.parametrize("init", ["zero", "uniform", "gaussian"])
def test_starts(data, init):
    pgd, b, store = _blocks(data)
    store.delta.fill_(EPS)  # a stored value that "keep" would continue from
    pgd.per_batch(b.ordered(16), ce, steps=1, step_size=1e-12, init=init)
    d = store.delta
    if init == "zero":
        assert d.abs().max() < 1e-9
    else:
        assert float(d.abs().max()) <= EPS + 1e-6 and float(d.std()) > EPS / 4 and (d != EPS).float().mean() > 0.5
    with pytest.raises(ValueError, match="init"):
        pgd.per_batch(b.ordered(16), ce, steps=1, step_size=1 / 255, init="ones")


def test_classwise_step_follows_the_summed_gradient(data):
    """One step on one batch holding every image: each class row moves by the sign of the sum
    of its samples' gradients."""
    pgd, b, store = _blocks(data, classwise=True)
    idx = torch.arange(b.n)
    leaf = torch.zeros(3, 3, 32, 32, requires_grad=True)
    with pgd.surrogate.frozen():
        g, = torch.autograd.grad(ce(*pgd.surrogate.forward(b.clean(idx) + leaf[b.labels]), b.labels), leaf)
    pgd.classwise([idx], ce, steps=1, step_size=1 / 255)
    expected = -torch.sign(g) / 255
    assert torch.allclose(store.delta, expected, atol=1e-7)
    assert store.per_sample_cpu().shape == (b.n, 3, 32, 32)


def test_whole_set_pass_equals_one_batch_holding_the_whole_set(data):
    """The two-pass whole-set step (features without a graph, then back-propagation batch by
    batch) takes the steps of an ordinary pass whose single batch is the whole set; a loss that
    couples samples tells per-batch passes apart."""
    def coupled(features, logits, y):  # depends on the whole batch: features against their mean
        f = features.float()
        return ((f - f.mean(0)) ** 2).sum(1).mean()

    one_pgd, b1, one = _blocks(data)
    one_pgd.per_batch(b1.ordered(b1.n), coupled, steps=3, step_size=1 / 255, maximize=True)
    split_pgd, b2, split = _blocks(data)
    out = split_pgd.whole_set(coupled, steps=3, step_size=1 / 255, batch_size=5, maximize=True)
    assert split.delta.abs().max() > 0 and out["poison_loss"] > 0
    assert (one.delta != split.delta).float().mean() < 1e-3  # a step's sign may flip where |grad| ~ 0
    batched_pgd, b3, batched = _blocks(data)
    batched_pgd.per_batch(b3.ordered(5), coupled, steps=3, step_size=1 / 255, maximize=True)
    assert (batched.delta != split.delta).float().mean() > 0.1


def test_mask_is_checkpointed(data):
    pgd, b, store = _blocks(data)
    assert pgd.state_dict() == {}
    pgd.mask = torch.ones(b.n, 1, 32, 32, dtype=torch.bool)
    other, _, _ = _blocks(data)
    other.load_state_dict(pgd.state_dict())
    assert torch.equal(other.mask, pgd.mask)


def test_adamw_rows_follow_torch_adamw(gen):
    """Batch-by-batch AdamW on rows of x + delta equals torch.optim.AdamW on the whole tensor
    (maximize, weight decay), then the projection."""
    cpu = torch.device("cpu")
    n = 10
    x = torch.rand(n, 3, 4, 4, generator=gen)
    store = PerturbationStore(n, (3, 4, 4), device=cpu, place=cpu, dtype=torch.float32, eps=0.5, seed=0)
    adam = AdamW(store, lr=0.01, weight_decay=0.1, maximize=True, grad_scale=3.0)
    p = x.clone().requires_grad_(True)
    ref = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1, maximize=True, foreach=False)
    for _ in range(4):
        g = torch.randn(n, 3, 4, 4, generator=gen)
        adam.begin_step()
        for idx in (torch.arange(0, 6), torch.arange(6, n)):
            store.put(idx, adam.step(idx, x[idx], store.get(idx), g[idx]))
        p.grad = 3.0 * g
        ref.step()
        with torch.no_grad():  # the projection (eps 0.5 and [0, 1]) the store's delta gets
            p.copy_(x + ((p - x).clamp(-0.5, 0.5) + x).clamp(0, 1) - x)
    torch.testing.assert_close(x + store.delta, p.detach(), rtol=1e-5, atol=1e-6)
    other = AdamW(store, lr=0.01, weight_decay=0.1)
    other.load_state_dict(adam.state_dict())
    assert other.t == 4 and torch.equal(other.m, adam.m)
