"""PIL: the linear surrogate, the loss against the authors' formulation, and the attack on it."""
import math

import pytest
import torch
import torch.nn.functional as F

from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import Runner
from ue_fast.methods import PIL, PILConfig
from ue_fast.models import SURROGATE_ARCHS, ARCHS, LinearNet, build_model, count_parameters


def test_linear_surrogate_is_a_bias_free_rank_c_map():
    net = build_model("linear", 10, image_size=32)
    assert isinstance(net, LinearNet) and "linear" in SURROGATE_ARCHS and "linear" not in ARCHS
    assert count_parameters(net) == 3 * 32 * 32 * 10 + 10 * 10
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Linear))
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    fa, la = net(a)
    fb, lb = net(b)
    f, logits = net(2 * a - b)  # linear: f(2a - b) = 2 f(a) - f(b)
    torch.testing.assert_close(logits, 2 * la - lb, rtol=1e-4, atol=1e-5)
    assert f.shape == (2, 10) and logits.shape == (2, 10)
    assert net(torch.rand(1, 3, 40, 24))[1].shape == (1, 10)  # other sizes: resized to 32 x 32 first


def test_loss_is_the_authors_with_delta_minus_noise():
    """Theirs (attacks.py): lmd CE(f(n), y) + (1 - lmd) kl_div(log softmax f(x - n), uniform, batchmean)."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    net = build_model("linear", 10)
    x = torch.rand(8, 3, 32, 32, generator=g)
    n = (torch.rand(8, 3, 32, 32, generator=g) * 2 - 1) * 8 / 255
    y = torch.randint(0, 10, (8,), generator=g)
    logp = F.log_softmax(net(x - n)[1], dim=1)
    kl = F.kl_div(logp, torch.full_like(logp, 0.1), reduction="batchmean")
    theirs = 0.9 * F.cross_entropy(net(n)[1], y) + 0.1 * kl
    method = PIL(PILConfig(), 10)
    delta = -n
    feats, logits = net(method.inputs(x, delta, y))
    torch.testing.assert_close(method.loss(feats, logits, y), theirs)


def test_defaults_are_the_authors():
    cfg = PILConfig()
    assert (cfg.arch, cfg.pretrain_epochs, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("linear", 30, 0.003, 0.0, 512)
    assert (cfg.pgd_steps, cfg.alpha, cfg.lmd, cfg.init, cfg.augment) == (30, pytest.approx(8 / 2550), 0.9,
                                                                          "uniform", False)
    assert cfg.pretrain_lr(1) == 0.003
    assert cfg.pretrain_lr(16) == pytest.approx(0.003 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_the_noise_alone_is_classified_as_its_class(tmp_path):
    """After a PIL run the frozen linear surrogate labels the noise n = -delta alone as y far more
    often than chance: the shortcut PIL plants."""
    src = demo_subset(tmp_path / "in", per_class=30)
    data = read_image_folder(src, progress=False)
    runner = Runner(PIL(PILConfig(pretrain_epochs=10, batch_size=32)), data.images, data.labels, 3,
                    torch.device("cpu"), progress=False)
    result = runner.run()
    net = runner.method.surrogate.model.eval()
    with torch.no_grad():
        acc = float((net(-result.delta)[1].argmax(1) == data.labels).float().mean())
    assert acc > 0.9, acc
