"""EM, class-wise EM and REM end to end on real images (subsets of the shipped CIFAR-10 demo), on the CPU."""
import json

import pytest
import torch
import torch.nn.functional as F

import ue_fast
from _helpers import demo_sets, protect_killed_after_checkpoint, protected_victim, victim_accuracy
from _helpers import demo_subset as _subset
from ue_fast.data import read_image_folder
from ue_fast.data.exports import load_delta_npy
from ue_fast.engine import BiLevelEngine
from ue_fast.methods import METHODS
from ue_fast.methods.em import EMClasswiseConfig, EMConfig
from ue_fast.methods.rem import REM, REMConfig, random_crop_flip

FAST = dict(arch="cnn-small", epochs=2, pgd_steps=2, batch_size=16, poison_batch_size=32, progress=False,
            device="cpu")
# Tiny schedules per method: a couple of surrogate batches, a one-step adversary, two EOT draws.
TINY = {
    "em": dict(train_steps=2, stop_acc=1.0),
    "em-classwise": dict(train_steps=2, stop_acc=1.0),
    "rem": dict(adv_steps=1, eot_samples=2),
}
NAMES = sorted(TINY)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _subset(tmp_path_factory.mktemp("in"))


@pytest.fixture(scope="module")
def runs(src, tmp_path_factory):
    """One protect() run per method: {name: (output folder, manifest)}."""
    out = {}
    for name in NAMES:
        o = tmp_path_factory.mktemp(name) / "protected"
        out[name] = (o, ue_fast.protect(src, o, method=name, eps=8, **FAST, **TINY[name]))
    return out


def test_registered():
    assert {"em", "em-classwise", "rem"} <= set(METHODS)
    assert METHODS["em-classwise"].classwise and not METHODS["em"].classwise and not METHODS["rem"].classwise


@pytest.mark.parametrize("name", NAMES)
def test_every_pixel_within_eps_and_perturbed(runs, src, name):
    out, manifest = runs[name]
    clean = read_image_folder(src, progress=False)
    prot = read_image_folder(out, progress=False)
    diff = prot.images.to(torch.int16) - clean.images.to(torch.int16)
    assert int(diff.abs().max()) <= 8 and manifest["linf_max_255"] <= 8
    assert float((diff != 0).float().mean()) > 0.2, "the perturbation barely moved"
    assert torch.equal(load_delta_npy(out / "perturbation_int8.npy").to(torch.int16), diff)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["method"] == name and len(on_disk["history"]) == 2
    assert on_disk["history"][-1]["finished"] is False


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes(runs, src, tmp_path, name):
    out, _ = runs[name]
    ue_fast.protect(src, tmp_path / "again", method=name, eps=8, **FAST, **TINY[name])
    assert (tmp_path / "again" / "perturbation_int8.npy").read_bytes() == (out / "perturbation_int8.npy").read_bytes()
    other = ue_fast.protect(src, tmp_path / "seed", method=name, eps=8, **dict(FAST, seed=123), **TINY[name])
    assert other["seed"] == 123
    assert (tmp_path / "seed" / "perturbation_int8.npy").read_bytes() != (out / "perturbation_int8.npy").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_interruption_equals_uninterrupted(runs, src, tmp_path, monkeypatch, name):
    """Killed right after round 1's checkpoint, then resumed: the bytes of the uninterrupted run."""
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", method=name, eps=8, **FAST, **TINY[name])
    assert (tmp_path / "split" / ".ue_fast" / "checkpoint.pt").is_file()
    m = ue_fast.protect(src, tmp_path / "split", method=name, eps=8, resume=True, **FAST, **TINY[name])
    assert m["resumed_from_epoch"] == 1
    whole, _ = runs[name]
    assert (tmp_path / "split" / "perturbation_int8.npy").read_bytes() == (whole / "perturbation_int8.npy").read_bytes()


# -- EM --------------------------------------------------------------------------------------

def test_em_stops_when_stop_acc_is_reached(runs, src, tmp_path):
    m = ue_fast.protect(src, tmp_path / "o", method="em", eps=8, **dict(FAST, epochs=5), train_steps=2, stop_acc=0.0)
    assert len(m["history"]) == 1, "stop_acc=0 is reached after the first round"
    h = m["history"][0]
    assert h["finished"] is True and 0.0 <= h["poisoned_acc"] <= 1.0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["history"][0]["finished"] is True
    # with an unreachable criterion every round runs, each recording the accuracy it checked
    hist = runs["em"][1]["history"]
    assert [h["finished"] for h in hist] == [False, False] and all(h["poisoned_acc"] < 1.0 for h in hist)


def test_em_classwise_one_perturbation_per_class(runs, src):
    """Every image of a class carries the same perturbation wherever its own pixel clip did not bite."""
    clean = read_image_folder(src, progress=False)
    x = clean.images.to(torch.int16)
    free = (x >= 8) & (x <= 247)  # pixels where x + delta cannot leave [0, 255]
    for name, shared in (("em-classwise", True), ("em", False)):
        d = load_delta_npy(runs[name][0] / "perturbation_int8.npy").to(torch.int16)
        for c in range(len(clean.classes)):
            rows = (clean.labels == c).nonzero().flatten().tolist()
            ref = rows[0]
            same = [bool((d[i] == d[ref])[free[i] & free[ref]].all()) for i in rows[1:]]
            assert all(same) if shared else not any(same), (name, c)
    d = load_delta_npy(runs["em-classwise"][0] / "perturbation_int8.npy")
    assert int(d.abs().max()) > 0


def test_em_defaults_and_validation(src, tmp_path):
    cfg = EMConfig()
    assert (cfg.pgd_steps, round(cfg.alpha * 255, 6), round(cfg.eps * 255, 6)) == (20, 0.8, 8)
    assert (cfg.train_steps, cfg.stop_acc, cfg.batch_size, cfg.poison_batch_size) == (10, 0.99, 512, 512)
    assert (cfg.lr, cfg.weight_decay, cfg.post_aug) == (0.1, 5e-4, False)
    assert cfg.learning_rate(1) == cfg.learning_rate(cfg.epochs) == 0.1  # constant while searching
    assert EMClasswiseConfig().pgd_steps == 1
    for bad in (dict(stop_acc=1.5), dict(stop_acc=-0.1), dict(stop_acc="high")):
        with pytest.raises(ValueError, match=f"stop_acc.*{bad['stop_acc']!r}"):
            EMConfig(**bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"train_steps.*{bad!r}"):
            EMConfig(train_steps=bad)
    with pytest.raises(ValueError, match="stop_acc"):
        ue_fast.protect(src, tmp_path / "o", method="em-classwise", stop_acc=2, **FAST)
    with pytest.raises(ValueError, match="no setting"):
        ue_fast.protect(src, tmp_path / "o", method="em", adv_eps=4 / 255, **FAST)


# -- REM -------------------------------------------------------------------------------------

@pytest.fixture
def rem_engine(src):
    data = read_image_folder(src, progress=False)
    cfg = REMConfig(arch="cnn-small", batch_size=16, poison_batch_size=32, adv_steps=5, eot_samples=3)
    engine = BiLevelEngine(REM(cfg, 3), data.images, data.labels, 3, "cpu", progress=False)
    x, y = data.images.float() / 255, engine.labels
    opt = torch.optim.SGD(engine.model.parameters(), lr=0.05, momentum=0.9)
    engine.model.train()
    for _ in range(8):  # a surrogate that has learnt something
        opt.zero_grad()
        F.cross_entropy(engine.forward(x)[1], y).backward()
        opt.step()
    return engine, x, y


def _ce(engine, x, y):
    engine.model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(engine.forward(x)[1], y))


def test_rem_adversary_raises_the_loss_within_its_radius(rem_engine):
    engine, x, y = rem_engine
    method = engine.method
    eps = method.config.adv_eps
    engine.model.train()  # as during surrogate training
    rho = method.adversary(engine, x, y)
    assert engine.model.training, "the adversary must give the surrogate back in the mode it found it"
    assert all(p.requires_grad for p in engine.model.parameters())
    assert rho.shape == x.shape and not rho.requires_grad
    assert float(rho.abs().max()) <= eps + 1e-6
    assert float((x + rho).min()) >= 0 and float((x + rho).max()) <= 1
    clean, adv = _ce(engine, x, y), _ce(engine, x + rho, y)
    g = torch.Generator().manual_seed(0)
    noise = ((torch.randint(0, 2, x.shape, generator=g) * 2 - 1) * eps + x).clamp(0, 1)  # random corners of the ball
    rand = _ce(engine, noise, y)
    # measured: clean 0.777, random corners 0.777, adversary 0.922 (5 steps at 4/255)
    assert adv > clean + 0.07 and adv > rand + 0.07, (clean, rand, adv)
    # frozen-eval callers (the poison pass) get their state back too
    engine.model.eval()
    engine.model.requires_grad_(False)
    method.adversary(engine, x[:4], y[:4])
    assert not engine.model.training and not any(p.requires_grad for p in engine.model.parameters())
    engine.model.requires_grad_(True)
    method.config.adv_steps = 0
    assert not method.adversary(engine, x, y).any()


def test_rem_poison_input_is_eot_views_plus_adversary(rem_engine):
    engine, x, y = rem_engine
    method = engine.method
    k = method.config.eot_samples
    engine.model.eval()
    engine.model.requires_grad_(False)
    delta = torch.zeros(8, *x.shape[1:], requires_grad=True)
    inp = method.poison_input(engine, x[:8], delta, y[:8])
    assert inp.shape == (k * 8, *x.shape[1:])
    loss = method.poison_loss(*engine.forward(inp), y[:8])
    (grad,) = torch.autograd.grad(loss, delta)
    assert grad.abs().sum() > 0, "the loss must be differentiable in delta through the views"
    with pytest.raises(ValueError, match="multiple"):
        method.poison_loss(None, torch.zeros(10, 3), y[:4])


def test_random_crop_flip_matches_pad_crop_flip():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 10)
    out = random_crop_flip(x, 2, g)
    g = torch.Generator().manual_seed(1)
    i, j = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    assert 0 < int(flip.sum()) < 16
    for n in range(16):
        xp = F.pad(x[n], (2, 2, 2, 2))
        if flip[n]:  # flip the padded image, crop at the mirrored offset
            ref = xp.flip(-1)[:, i[n]:i[n] + 8, 4 - j[n]:4 - j[n] + 10]
        else:
            ref = xp[:, i[n]:i[n] + 8, j[n]:j[n] + 10]
        assert torch.equal(out[n], ref), n


def test_rem_defaults_schedule_and_validation(src, tmp_path):
    cfg = REMConfig()
    assert (round(cfg.eps * 255, 6), cfg.pgd_steps, round(cfg.alpha * 255, 6)) == (8, 10, 1.6)
    assert (round(cfg.adv_eps * 255, 6), cfg.adv_steps, round(cfg.adv_alpha * 255, 6)) == (4, 10, 0.8)
    assert (cfg.eot_samples, cfg.batch_size, cfg.weight_decay, cfg.epochs, cfg.post_aug) == (5, 128, 5e-4, 13, False)
    lrs = [round(cfg.learning_rate(e), 9) for e in range(1, 14)]
    assert lrs == [0.1] * 6 + [0.01] * 5 + [0.001] * 2
    for field, bad in (("adv_eps", -0.01), ("adv_eps", 2.0), ("adv_steps", -1), ("adv_alpha", 0.0),
                       ("eot_samples", 0), ("crop_padding", -1), ("lr_decay_rate", 0.0)):
        with pytest.raises(ValueError, match=f"{field}.*{bad!r}"):
            REMConfig(**{field: bad})
    with pytest.raises(ValueError, match="eot_samples"):
        ue_fast.protect(src, tmp_path / "o", method="rem", eot_samples=0, **FAST)


# -- effectiveness ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    """The 1,000 demo training images, the 200 demo test images, and a clean cnn-small victim's accuracy."""
    train, test = demo_sets()
    return train, test, victim_accuracy(train, train.images, test, epochs=15)


def _protected_victim(demo, tmp_path, method, **settings) -> tuple[float, float, dict]:
    train, test, acc_clean = demo
    acc, m = protected_victim(train, test, tmp_path / "p", method, 15, arch="cnn-small", **settings)
    print(f"victim test accuracy: clean {acc_clean:.3f}, {method} {acc:.3f} after {len(m['history'])} rounds")
    return acc_clean, acc, m


@pytest.mark.slow
def test_em_protected_set_is_much_less_learnable(demo, tmp_path):
    """Sample-wise EM on the 1,000 demo images; a cnn-small victim (15 epochs, crop + flip) tested on
    the 200 demo test images.

    CPU schedule: cnn-small surrogate, rounds of one surrogate epoch (batch 128, lr 0.05: at 0.1
    this small network's eval-mode loss spikes; at 0.02 it memorises the 1,000 clean images
    before it learns the noise) and 3 PGD steps of 2/255, until the surrogate fits x + delta to
    99% (10-14 rounds measured), at most 16. Measured when written (2-core CPU, victim seed 0):
    clean 0.420 (0.415-0.445 over victim seeds 0-2); protected 0.235 with the default two
    threads (stopped at round 10), and 0.22, 0.27, 0.27 for generator seeds 7, 1, 2 on one
    thread. ~32 s on 2 idle cores (plus the shared clean victim, ~8 s). On this small set
    sample-wise EM is chaotic: tiny changes of the arithmetic (thread count, the 10th digit of
    alpha, the round cap) moved the protected accuracy between 0.17 and 0.34 in the trials.
    """
    acc_clean, acc, m = _protected_victim(demo, tmp_path, "em", epochs=16, pgd_steps=3, alpha=2 / 255,
                                          lr=0.05, batch_size=128)
    assert acc_clean > 0.30, "the clean victim should learn well above chance (10%)"
    # measured gap 0.15-0.25; the threshold leaves room for other CPUs' arithmetic
    assert acc < acc_clean - 0.08 and acc < 0.35
    assert m["history"][-1]["poisoned_acc"] > 0.8, "the surrogate should have fitted the perturbed set"


@pytest.mark.slow
def test_em_classwise_protected_set_is_much_less_learnable(demo, tmp_path):
    """Class-wise EM on the 1,000 demo images, victim as above.

    CPU schedule: cnn-small surrogate, at most 16 rounds of one surrogate epoch (batch 128, lr 0.1)
    and one PGD step of 0.8/255 per batch of 128, stop at 99%. Measured when written (2-core CPU):
    stopped after 14-15 rounds; protected 0.25 with two threads (clean 0.42), 0.23-0.24 over
    victim seeds 0-2 on one thread (clean 0.415-0.445); ~18 s on 2 idle cores.
    """
    acc_clean, acc, m = _protected_victim(demo, tmp_path, "em-classwise", epochs=16, batch_size=128,
                                          poison_batch_size=128)
    assert acc_clean > 0.30
    assert acc < acc_clean - 0.10 and acc < 0.32
    assert m["history"][-1]["finished"], "the 99% criterion should end the run before round 16"
