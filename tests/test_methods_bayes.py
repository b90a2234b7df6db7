"""Bayes-error UEs (``ue_fast.methods.bayes``): the loss's options, the settings, the schedules.
The estimator itself is tested in ``test_bayes.py``; the contract in ``test_methods_contract.py``."""
import math

import pytest
import torch

from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import Runner
from ue_fast.methods import Bayes, BayesConfig
from ue_fast.ops import bayes as bayes_mod


def _method(num_classes=4, **settings):
    m = Bayes(BayesConfig(**settings))
    m.num_classes = num_classes
    return m


@pytest.mark.parametrize("feature_scale", ["max", "l2", "none"])
@pytest.mark.parametrize("sigma", [0.3, None])
def test_loss_options(gen, feature_scale, sigma):
    method = _method(sigma=sigma, feature_scale=feature_scale)
    f = torch.rand(40, 16, generator=gen).mul(3).requires_grad_(True)
    y = torch.arange(40) % 4
    loss = method.loss(f, None, y)
    loss.backward()
    assert 0 <= loss.item() < 1 and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    if sigma is None:  # the median heuristic, by its definition
        g = method.scaled(f).detach().double()
        d2 = ((g[:, None] - g[None]) ** 2).sum(-1)
        med = d2[torch.triu(torch.ones(40, 40, dtype=torch.bool), 1)].median()
        assert bayes_mod.median_bandwidth(method.scaled(f)) == pytest.approx(math.sqrt(med / 2), rel=1e-5)
    one = f[:1].detach().clone().requires_grad_(True)  # a last batch can hold one sample
    method.loss(one, None, y[:1]).backward()
    assert float(one.grad.abs().sum()) == 0


def test_config_defaults_and_validation():
    b = BayesConfig()  # the authors' script
    assert (b.sigma, b.feature_scale, b.train_surrogate, b.retrain_epochs, b.whole_set) == (0.3, "max", True, 30, True)
    assert (b.ascent, b.adam_lr, b.adam_weight_decay, b.epochs, b.pgd_steps, b.batch_size, b.weight_decay) == (
        "adamw", 1e-3, 0.01, 2000, 1, 128, 5e-4)
    for bad, match in (({"sigma": 0.0}, "sigma .* got 0.0"), ({"sigma": float("nan")}, "sigma .* got nan"),
                       ({"feature_scale": "std"}, "feature_scale .* got 'std'"),
                       ({"pretrain_epochs": 1.5}, "pretrain_epochs .* got 1.5"),
                       ({"retrain_epochs": -1}, "retrain_epochs .* got -1"),
                       ({"retrain_epochs": 2, "train_surrogate": False}, "cannot be combined"),
                       ({"whole_set": 1}, "whole_set must be True or False"),
                       ({"whole_set": False}, "needs whole_set=True"), ({"ascent": "adam"}, "ascent .* got 'adam'"),
                       ({"adam_lr": 0}, "adam_lr .* got 0"),
                       ({"train_surrogate": "yes"}, "train_surrogate must be True or False")):
        with pytest.raises(ValueError, match=match):
            BayesConfig(**bad)


def test_fresh_surrogate_every_round_is_seeded_by_the_round(tmp_path):
    """retrain_epochs: each round re-initialises the surrogate from (seed, round), whatever came before."""
    data = read_image_folder(demo_subset(tmp_path / "in"), progress=False)
    cfg = dict(arch="cnn-small", epochs=2, batch_size=12, retrain_epochs=1)
    a = Runner(Bayes(BayesConfig(**cfg)), data.images, data.labels, 3, "cpu", progress=False)
    a.run()
    b = Runner(Bayes(BayesConfig(**cfg)), data.images, data.labels, 3, "cpu", progress=False)
    for r in (a, b):
        r.method.surrogate.reinit(7 + 1_000_003 * 2)  # round 2's weights
    sa, sb = a.method.surrogate.model.state_dict(), b.method.surrogate.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_adamw_ascent_raises_the_whole_set_estimate(tmp_path):
    """The authors' step: AdamW on x + delta ascending the whole-set estimate of a frozen surrogate."""
    data = read_image_folder(demo_subset(tmp_path / "in"), progress=False)
    cfg = BayesConfig(arch="cnn-small", epochs=6, retrain_epochs=0, train_surrogate=False, pretrain_epochs=3,
                      adam_lr=2e-3, batch_size=12)
    r = Runner(Bayes(cfg), data.images, data.labels, 3, "cpu", progress=False)
    res = r.run()
    losses = [h["poison_loss"] for h in res.history if "epoch" in h]  # E before each step
    assert losses[-1] > losses[0], losses
    assert r.method.adam.t == 6 and float(res.delta.abs().max()) <= 8 / 255 + 1e-6
