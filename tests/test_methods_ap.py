"""AP / TAP (``ue_fast.methods.ap``): the authors' settings, restarts that keep the best, the
effect on the surrogate; HYPO's settings and direction. The protection on a victim is tested
with the other methods' in ``test_methods_work_16px.py``."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import Runner
from ue_fast.methods import AP, TAP, APConfig


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return read_image_folder(demo_subset(tmp_path_factory.mktemp("in")), progress=False)


def test_configs_defaults_and_validation():
    cfg = APConfig()
    assert (cfg.epochs, cfg.pgd_steps, cfg.pretrain_epochs, cfg.weight_decay) == (1, 250, 40, 5e-4)
    assert (cfg.restarts, cfg.init, cfg.nesterov, cfg.pretrain_augment, cfg.augment) == (8, "gaussian", True, True,
                                                                                          True)
    assert cfg.alpha == pytest.approx(0.05 * 8 / 255)
    assert APConfig(eps=16 / 255).alpha == pytest.approx(0.05 * 16 / 255)
    assert APConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in (({"pretrain_epochs": -1}, "pretrain_epochs .* got -1"),
                       ({"pretrain_schedule": "linear"}, "pretrain_schedule .* got 'linear'"),
                       ({"max_shift": -1.0}, "max_shift .* got -1.0"), ({"alpha": 0.0}, "alpha .* got 0.0"),
                       ({"eps": 0.0}, "eps .* got 0.0"), ({"restarts": 0}, "restarts .* got 0"),
                       ({"init": "keep"}, "init .* got 'keep'"), ({"augment": 1}, "augment must be True or False"),
                       ({"nesterov": True, "momentum": 0.0}, "nesterov needs momentum")):
        with pytest.raises(ValueError, match=match):
            APConfig(**bad)


def test_pretraining_lr_follows_the_authors_steps():
    cfg = APConfig(pretrain_epochs=40)
    # 40 // 2.667, 40 // 1.6, 40 // 1.142 = 14, 24 (1.6 is a hair above 8/5 in binary), 35
    lrs = {e: cfg.pretrain_lr(e) for e in (1, 14, 15, 24, 25, 35, 36, 40)}
    expected = {1: 0.1, 14: 0.1, 15: 0.01, 24: 0.01, 25: 1e-3, 35: 1e-3, 36: 1e-4, 40: 1e-4}
    assert lrs == pytest.approx(expected)
    cos = APConfig(pretrain_epochs=40, pretrain_schedule="cosine")
    assert cos.pretrain_lr(1) == pytest.approx(0.1) and cos.pretrain_lr(40) < 1e-3


def test_restarts_keep_the_best_objective(subset):
    cfg = APConfig(arch="cnn-small", pretrain_epochs=1, pgd_steps=2, restarts=3, batch_size=12, poison_batch_size=36)
    r = Runner(AP(cfg), subset.images, subset.labels, 3, "cpu", progress=False)
    res = r.run()
    passes = [h for h in res.history if "epoch" in h]
    assert [h["restart"] for h in passes] == [1, 2, 3]
    best = max(h["poison_loss"] for h in passes)  # AP ascends CE: the highest is the best
    assert r.method.best_score == pytest.approx(-best)
    assert torch.equal(r.method.store.delta, r.method.best.delta)


def test_gaussian_start_is_clipped_noise(subset):
    """init="gaussian" starts from clip(eps N(0, 1), -eps, eps): with no step, the start is the output."""
    cfg = APConfig(arch="cnn-small", pretrain_epochs=0, pgd_steps=1, alpha=1e-9, restarts=1, augment=False,
                   init="gaussian")
    d = Runner(AP(cfg), subset.images, subset.labels, 3, "cpu", progress=False).run().delta
    eps = 8 / 255
    assert float(d.abs().max()) <= eps + 1e-6
    assert 0.2 < float((d.abs() > eps - 1e-6).float().mean()) < 0.5  # P(|N(0,1)| > 1) = 0.32, less the pixel clip


def _attack(cls, subset):
    cfg = APConfig(arch="cnn-small", pretrain_epochs=8, pretrain_schedule="cosine", pgd_steps=10, alpha=1 / 255,
                   batch_size=12, poison_batch_size=36, seed=3, restarts=1, init="zero")
    r = Runner(cls(cfg), subset.images, subset.labels, 3, "cpu", progress=False)
    delta = r.run().delta  # float, in [0, 1] pixel units
    model = r.method.surrogate.model.eval()
    x = subset.images.float() / 255
    with torch.no_grad():
        _, clean_logits = model(x)
        _, poison_logits = model((x + delta).clamp(0, 1))
    return subset.labels, clean_logits, poison_logits


def test_tap_moves_surrogate_predictions_to_the_next_class(subset):
    """Measured when written: CE to the target 3.86 -> 2.33, target hits 0.19 -> 0.42."""
    y, clean_logits, poison_logits = _attack(TAP, subset)
    target = (y + 1) % 3
    ce_clean, ce_poison = F.cross_entropy(clean_logits, target), F.cross_entropy(poison_logits, target)
    hit_clean = (clean_logits.argmax(1) == target).float().mean()
    hit_poison = (poison_logits.argmax(1) == target).float().mean()
    assert ce_poison < ce_clean - 0.5, (ce_clean, ce_poison)
    assert hit_poison > hit_clean + 0.1, (hit_clean, hit_poison)


def test_ap_raises_surrogate_cross_entropy(subset):
    """Measured when written: CE 0.95 -> 2.24, accuracy 0.58 -> 0.31."""
    y, clean_logits, poison_logits = _attack(AP, subset)
    ce_clean, ce_poison = F.cross_entropy(clean_logits, y), F.cross_entropy(poison_logits, y)
    acc_clean = (clean_logits.argmax(1) == y).float().mean()
    acc_poison = (poison_logits.argmax(1) == y).float().mean()
    assert ce_poison > ce_clean + 0.5, (ce_clean, ce_poison)
    assert acc_poison < acc_clean - 0.15, (acc_clean, acc_poison)


# ----------------------------------------------------------------------------- HYPO
def test_hypo_defaults_are_the_authors():
    from ue_fast.methods import HYPOConfig

    cfg = HYPOConfig()
    assert (cfg.pgd_steps, cfg.alpha, cfg.eps, cfg.init, cfg.restarts, cfg.augment) == (
        100, pytest.approx(0.8 / 255), pytest.approx(8 / 255), "zero", 1, True)
    assert (cfg.pretrain_epochs, cfg.pretrain_adv_eps, cfg.pretrain_adv_steps, cfg.nesterov) == (
        10, pytest.approx(2 / 255), 10, False)
    assert {cfg.pretrain_lr(e) for e in range(1, 11)} == {0.1}  # their milestones 75, 90 are never reached
    assert HYPOConfig(alpha=None, eps=4 / 255).alpha == pytest.approx(0.4 / 255)


def test_hypo_trains_its_model_on_adversarial_examples_then_descends_its_loss(subset, monkeypatch):
    """The crafting model's batches pass through the small-budget adversary (eps 2/255, steps
    eps/4); after the attack the frozen model's cross-entropy at the true labels is lower on
    x + delta than on x (error-minimising), unlike AP's."""
    from ue_fast.generation.transforms import Adversary
    from ue_fast.methods import HYPO, HYPOConfig

    seen = []
    real = Adversary.__call__

    def spy(self, x, y, views=1):
        seen.append((self.eps, self.steps, self.step_size))
        return real(self, x, y, views)

    monkeypatch.setattr(Adversary, "__call__", spy)
    cfg = HYPOConfig(arch="cnn-small", pretrain_epochs=10, pretrain_adv_steps=2, pgd_steps=20, alpha=2 / 255,
                     batch_size=16, augment=False)
    runner = Runner(HYPO(cfg), subset.images, subset.labels, 3, torch.device("cpu"), progress=False)
    result = runner.run()
    assert len(seen) == 10 * 3 and set(seen) == {(2 / 255, 2, 0.5 / 255)}  # 10 epochs x 3 batches of 16 (36 images)
    model = runner.method.surrogate.model.eval()
    x = subset.images.float() / 255
    with torch.no_grad():
        before = F.cross_entropy(model(x)[1], subset.labels)
        after = F.cross_entropy(model((x + result.delta).clamp(0, 1))[1], subset.labels)
    assert after < 0.8 * before, (float(before), float(after))  # measured 2.81 -> 1.93
