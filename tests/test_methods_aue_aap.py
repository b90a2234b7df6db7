"""AUE / AAP: the contrastive augmentation (against definitions and colorsys), the schedules,
and the attacks' directions."""
import colorsys
import math

import pytest
import torch

from ue_fast.generation.transforms import (_JITTER, CONTRASTIVE_DRAWS, _gray, contrastive_augment, hsv_to_rgb,
                                           rgb_to_hsv)


def _jitter_ops(x, f):
    """x after each of brightness, contrast, saturation (factors f[:, 0:3]) and hue (shift f[:, 3])."""
    return [op(x, f[:, k].view(-1, 1, 1, 1)) for k, op in enumerate(_JITTER)]
from ue_fast.methods import AAP, AAPConfig, AUEConfig


@pytest.fixture
def x():
    return torch.rand(5, 3, 9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_hsv_matches_colorsys_and_round_trips(x):
    hsv = rgb_to_hsv(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    ref = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels], dtype=x.dtype)
    torch.testing.assert_close(hsv.permute(0, 2, 3, 1).reshape(-1, 3), ref)
    torch.testing.assert_close(hsv_to_rgb(hsv), x)
    grey = torch.full((1, 3, 2, 2), 0.4, dtype=x.dtype)  # no hue: s = 0
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(grey)), grey)


def test_jitter_operations_follow_their_definitions(x):
    f = torch.tensor([[1.3, 0.7, 1.2, 0.25]] * 5, dtype=x.dtype)
    bright, contrast, sat, hue = _jitter_ops(x, f)
    torch.testing.assert_close(bright, (1.3 * x).clamp(0, 1))
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(contrast, (0.7 * x + 0.3 * mean).clamp(0, 1))
    torch.testing.assert_close(sat, (1.2 * x + -0.2 * _gray(x)).clamp(0, 1))
    want = [colorsys.hsv_to_rgb((h + 0.25) % 1, s, v) for h, s, v in
            (colorsys.rgb_to_hsv(*p) for p in x.permute(0, 2, 3, 1).reshape(-1, 3).tolist())]
    torch.testing.assert_close(hue.permute(0, 2, 3, 1).reshape(-1, 3), torch.tensor(want, dtype=x.dtype))
    identity = _jitter_ops(x, torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 5, dtype=x.dtype))
    assert all(torch.allclose(o, x) for o in identity)


def test_a_no_op_draw_is_the_identity_and_draws_are_per_sample(x):
    x = x[:, :, :7, :7]  # square: an area-1 crop of aspect ratio 1 is the whole image
    u = torch.rand(5, CONTRASTIVE_DRAWS, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    u[:, 0], u[:, 1], u[:, 4], u[:, 5], u[:, 10] = 1 - 1e-12, 0.5, 0.9, 0.999, 0.999  # whole image, no flip/jitter/gray
    torch.testing.assert_close(contrastive_augment(x, u, 0.6), x, rtol=0, atol=1e-9)
    u[:, 4] = 0.1  # flip
    torch.testing.assert_close(contrastive_augment(x, u, 0.6), x.flip(-1), rtol=0, atol=1e-9)
    v = torch.rand(5, CONTRASTIVE_DRAWS, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    out = contrastive_augment(x, v, 1.0)
    assert torch.equal(out, contrastive_augment(x, v, 1.0))
    torch.testing.assert_close(contrastive_augment(x[2:3], v[2:3], 1.0), out[2:3])  # a sample's draws are its own
    assert out.min() >= 0 and out.max() <= 1


def test_gradients_flow_through_the_augmentation():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    u = torch.rand(8, CONTRASTIVE_DRAWS, generator=torch.Generator().manual_seed(4))
    (contrastive_augment(x, u, 1.0) ** 2).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_strength_sets_the_ranges():
    """At strength s: crop area >= max(1 - 0.9 s, 0.05); jitter with p = min(0.99, 0.8 s); gray with p = 0.2 s.
    Strength 0: no colour change at all."""
    x = torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    u = torch.rand(400, CONTRASTIVE_DRAWS, generator=torch.Generator().manual_seed(6))
    u[:, 0], u[:, 1], u[:, 4] = 1 - 1e-7, 0.5, 0.9  # the whole image, unflipped: only colour ops remain
    for s in (0.0, 0.5, 1.0):
        out = contrastive_augment(x, u, s)
        changed = (out - x).flatten(1).abs().amax(1) > 1e-5
        grey = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
        expect = (u[:, 5] < min(0.99, 0.8 * s)) | (u[:, 10] < 0.2 * s)
        assert torch.equal(changed, expect), s
        assert torch.equal(grey, u[:, 10] < 0.2 * s), s


def test_defaults_and_schedules_are_the_authors():
    aue = AUEConfig()
    assert (aue.epochs, aue.pgd_steps, aue.alpha, aue.batch_size, aue.weight_decay, aue.strength) == (
        60, 5, pytest.approx(0.8 / 255), 128, 1e-4, 0.6)
    assert aue.learning_rate(1) == pytest.approx(0.1) and aue.learning_rate(60) < 1e-3
    aap = AAPConfig()
    assert (aap.pgd_steps, aap.alpha, aap.lr, aap.pretrain_epochs, aap.strength, aap.pretrain_strength) == (
        250, pytest.approx(2.5 * 8 / 255 / 250), 0.5, 40, 0.4, 0.4)
    assert [aap.pretrain_lr(e) for e in (1, 5, 10, 11)] == pytest.approx([0.05, 0.25, 0.5, 0.5])
    assert aap.pretrain_lr(26) == pytest.approx(1e-6 + (0.5 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert aap.pretrain_lr(40) < 0.01
    with pytest.raises(ValueError, match="strength"):
        AUEConfig(strength=-0.1)


def test_aap_targeted_descends_towards_the_next_class_untargeted_ascends():
    t, u = AAP(AAPConfig(), 10), AAP(AAPConfig(targeted=False), 10)
    y = torch.tensor([0, 4, 9])
    assert not t.maximize and t.target(y).tolist() == [1, 5, 0]
    assert u.maximize and u.target(y).tolist() == [0, 4, 9]


def test_each_sample_takes_the_jitter_operations_in_its_own_order(x):
    from ue_fast.generation.transforms import _jitter

    f = torch.tensor([[1.3, 0.7, 1.2, 0.25]] * 5, dtype=x.dtype)
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(k)) for k in range(5)])
    out = _jitter(x, f, order)
    for b in range(5):
        want = x[b:b + 1]
        for k in order[b].tolist():
            want = _JITTER[k](want, f[b:b + 1, k].view(1, 1, 1, 1))
        torch.testing.assert_close(out[b:b + 1], want)
