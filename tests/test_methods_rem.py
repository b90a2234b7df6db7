"""REM (``ue_fast.methods.rem``): its inputs (expectation over augmentations plus the inner
adversary), the authors' settings and schedule. The adversary and the augmentation are
tested in ``test_generation_transforms.py``; the contract in ``test_methods_contract.py``."""
import pytest
import torch

import ue_fast
from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import Runner
from ue_fast.methods import REM, REMConfig

FAST = dict(arch="cnn-small", epochs=2, pgd_steps=2, batch_size=16, poison_batch_size=32, progress=False,
            device="cpu")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("in"))


def test_poison_input_is_eot_views_plus_adversary(src):
    data = read_image_folder(src, progress=False)
    cfg = REMConfig(arch="cnn-small", adv_steps=2, eot_samples=3)
    m = Runner(REM(cfg), data.images, data.labels, 3, "cpu", progress=False).method
    x, y = data.images[:8].float() / 255, m.data.labels[:8]
    delta = torch.zeros(8, *x.shape[1:], requires_grad=True)
    with m.surrogate.frozen():
        inp = m.eot_views(x, delta, y)
        assert inp.shape == (3 * 8, *x.shape[1:])
        loss = m.loss(*m.surrogate.forward(inp), y)
        (grad,) = torch.autograd.grad(loss, delta)
    assert grad.abs().sum() > 0, "the loss must be differentiable in delta through the views"
    with pytest.raises(ValueError, match="multiple"):
        m.loss(None, torch.zeros(10, 3), y[:4])


def test_rem_defaults_schedule_and_validation(src, tmp_path):
    cfg = REMConfig()
    assert (round(cfg.eps * 255, 6), cfg.pgd_steps, round(cfg.alpha * 255, 6)) == (8, 10, 1.6)
    assert (round(cfg.adv_eps * 255, 6), cfg.adv_steps, round(cfg.adv_alpha * 255, 6)) == (4, 10, 0.8)
    assert (cfg.eot_samples, cfg.batch_size, cfg.weight_decay, cfg.epochs, cfg.post_aug) == (5, 128, 5e-4, 13, False)
    lrs = [round(cfg.step_lr(s, 5000), 9) for s in (0, 1999, 2000, 3999, 4000, 4999)]
    assert lrs == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]  # their lr x0.1 at steps 2,000 and 4,000
    for field, bad in (("adv_eps", -0.01), ("adv_eps", 2.0), ("adv_steps", -1), ("adv_alpha", 0.0),
                       ("eot_samples", 0), ("crop_padding", -1), ("lr_decay_rate", 0.0)):
        with pytest.raises(ValueError, match=f"{field}.*{bad!r}"):
            REMConfig(**{field: bad})
    with pytest.raises(ValueError, match="eot_samples"):
        ue_fast.protect(src, tmp_path / "o", method="rem", eot_samples=0, **FAST)
