"""Input transforms (``ue_fast.generation.transforms``): the differentiable shift-and-flip, the
random crop-and-flip gather, and the inner adversary."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import Runner
from ue_fast.generation.transforms import Adversary, random_crop_flip, shift_flip
from ue_fast.methods import REM, REMConfig


def test_shift_flip(gen):
    x = torch.rand(2, 3, 8, 8, generator=gen, requires_grad=True)
    same = shift_flip(x, torch.tensor([[0.5, 0.5, 0.9]] * 2), 4.0)
    torch.testing.assert_close(same, x)
    torch.testing.assert_close(shift_flip(x, torch.tensor([[0.5, 0.5, 0.1]] * 2), 4.0), x.flip(-1))
    # +1 pixel in x (u = 0.625 of a 4-pixel range): each output pixel reads its right neighbour
    out = shift_flip(x, torch.tensor([[0.625, 0.5, 0.9]] * 2), 4.0)
    torch.testing.assert_close(out[..., :-1], x[..., 1:])
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1)
    torch.testing.assert_close(out[..., -1], mean.expand(2, 3, 8))
    out.sum().backward()
    assert x.grad[..., 0].abs().max() < 1e-5 and x.grad[..., 1:].min() > 0.99  # column 0 is never read


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


@pytest.fixture
def trained(tmp_path):
    """A cnn-small surrogate that has learnt something, with its run's data."""
    data = read_image_folder(demo_subset(tmp_path / "in"), progress=False)
    runner = Runner(REM(REMConfig(arch="cnn-small")), data.images, data.labels, 3, "cpu", progress=False)
    s = runner.method.surrogate
    x, y = data.images.float() / 255, runner.method.data.labels
    opt = torch.optim.SGD(s.model.parameters(), lr=0.05, momentum=0.9)
    s.model.train()
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(s.forward(x)[1], y).backward()
        opt.step()
    return s, runner.method.data.gen, x, y


def _ce(s, x, y):
    s.model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(s.forward(x)[1], y))


def test_adversary_raises_the_loss_within_its_radius(trained):
    s, gen, x, y = trained
    eps = 4 / 255
    adv = Adversary(s, gen, eps=eps, steps=5, step_size=0.8 / 255)
    s.model.train()  # as during surrogate training
    rho = adv(x, y)
    assert s.model.training, "the adversary must give the surrogate back in the mode it found it"
    assert all(p.requires_grad for p in s.model.parameters())
    assert rho.shape == x.shape and not rho.requires_grad
    assert float(rho.abs().max()) <= eps + 1e-6
    assert float((x + rho).min()) >= 0 and float((x + rho).max()) <= 1
    clean, attacked = _ce(s, x, y), _ce(s, x + rho, y)
    g = torch.Generator().manual_seed(0)
    noise = ((torch.randint(0, 2, x.shape, generator=g) * 2 - 1) * eps + x).clamp(0, 1)  # random corners of the ball
    rand = _ce(s, noise, y)
    # measured: clean 0.777, random corners 0.777, adversary 0.922 (5 steps at 4/255)
    assert attacked > clean + 0.07 and attacked > rand + 0.07, (clean, rand, attacked)
    with s.frozen():  # frozen callers (the PGD passes) get their state back too
        adv(x[:4], y[:4])
        assert not s.model.training and not any(p.requires_grad for p in s.model.parameters())
    assert not Adversary(s, gen, eps=eps, steps=0, step_size=0.8 / 255)(x, y).any()
