"""Defences of the victim loop (ue_fast.evaluate.defenses): each changes the part of
the pipeline it should, as its paper defines it, reproducibly from the generator."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from _defense_fixtures import UERASERS, batch, ce, clone, demo, model, small  # noqa: F401 (fixtures)
from ue_fast.evaluate.defenses import (
    DEFENSES, AdversarialTraining, BitDepthReduction, CutMix, Cutout, GaussianBlur, Grayscale, JPEG, Mixup,
    UEraser, get_defense,
)

DATA_LEVEL = ("none", "jpeg", "grayscale", "gaussian", "bdr", "op", "dvae")
BATCH_LEVEL = ("cutout", "cutmix", "mixup", "adv-train", "ueraser-lite", "ueraser", "ueraser-max", "coin")


def test_every_defense_acts_at_one_level():
    assert sorted(DATA_LEVEL + BATCH_LEVEL) == sorted(DEFENSES)


# --- which part of the pipeline each defence changes ------------------------

@pytest.mark.parametrize("name", ("none",) + BATCH_LEVEL)
def test_batch_level_defenses_leave_the_data_alone(name, demo, gen):
    images, labels = demo
    assert torch.equal(get_defense(name).prepare(images, gen, labels), images)


@pytest.mark.parametrize("name", DATA_LEVEL)
def test_data_level_defenses_train_with_plain_cross_entropy(name, batch, model, gen):
    x, y = batch
    loss, logits = get_defense(name).loss(model, x, y, gen)
    torch.testing.assert_close(loss, ce(model, x, y))
    torch.testing.assert_close(logits, model(x)[1])


# --- data level ---------------------------------------------------------------

def pillow_jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Independent reference: one uint8 [3, H, W] image through Pillow at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(buf, "JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())))).permute(2, 0, 1)


def test_jpeg_is_a_pillow_quality_10_round_trip(demo, gen):
    images = demo[0]
    out = JPEG().prepare(images, gen)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert (out != images).float().mean() > 0.5  # really re-encoded
    for i in range(len(images)):
        assert torch.equal(out[i], pillow_jpeg(images[i], 10)), f"image {i}"
    # Quality is honoured: 90 keeps the images much closer than 10.
    err = lambda q: (JPEG(quality=q).prepare(images, gen).float() - images.float()).abs().mean()  # noqa: E731
    assert err(90) < 0.5 * err(10)


def test_jpeg_keeps_a_smooth_image_close(gen):
    i = torch.arange(32.0)
    smooth = torch.stack([i[None, :].expand(32, 32) + 80, i[:, None].expand(32, 32) + 100,
                          (i[None, :] + i[:, None]) / 2 + 120]).round().to(torch.uint8)[None]
    diff = (JPEG().prepare(smooth, gen).int() - smooth.int()).abs()
    assert diff.max() <= 16 and diff.float().mean() <= 5


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [3, H, W] -> RGB Pillow image."""
    return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_grayscale_matches_pillow_luma(demo, gen):
    primaries = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [1, 2, 3]], dtype=torch.uint8)
    images = torch.cat([demo[0], primaries[:, :, None, None].expand(-1, -1, 32, 32)])
    out = Grayscale().prepare(images, gen)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    pil = torch.stack([torch.from_numpy(np.array(to_pil(im).convert("L"))) for im in images])
    # Pillow's integer formula is reproduced, so exactly (the brief asks for within 1).
    assert torch.equal(out[:, 0], pil)
    assert (out[:20].int() - images[:20].int()).abs().float().mean() > 5  # the colour is gone


def blur_reference(image: np.ndarray, sigma: float, k: int) -> np.ndarray:
    """Independent reference: a k x k Gaussian blur of one uint8 [H, W, 3] image, written
    plainly in float64 (reflected borders, the 2-D kernel summed pixel by pixel), rounded."""
    half = (k - 1) / 2
    t = np.linspace(-half, half, k)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g = np.outer(g, g) / np.outer(g, g).sum()
    p = k // 2
    padded = np.pad(image.astype(np.float64), ((p, p), (p, p), (0, 0)), mode="reflect")
    out = np.zeros(image.shape, dtype=np.float64)
    for dy in range(k):
        for dx in range(k):
            out += g[dy, dx] * padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_gaussian_blur_matches_a_direct_computation(demo, gen):
    images = demo[0]
    hwc = images.permute(0, 2, 3, 1).numpy()
    for sigma, k in ((1.0, 3), (0.8, 5)):
        out = GaussianBlur(kernel_size=k, sigma=sigma).prepare(images, gen)
        ref = torch.from_numpy(np.stack([blur_reference(im, sigma, k) for im in hwc])).permute(0, 3, 1, 2)
        diff = (out.to(torch.int16) - ref.to(torch.int16)).abs()
        # float32 against float64: a value within rounding distance of a half may round the other way
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3, (sigma, k)
        assert (out != images).float().mean() > 0.5  # it does blur
    # APBench's setting (3 x 3, sigma 0.1): the neighbours weigh exp(-50) of the centre, no pixel changes
    assert torch.equal(get_defense("gaussian").prepare(images, gen), images)


def test_bit_depth_reduction_is_pillow_posterize(demo, gen):
    images = demo[0]
    for bits in (2, 5):
        out = BitDepthReduction(bits=bits).prepare(images, gen)
        for i in range(len(images)):
            pil = ImageOps.posterize(Image.fromarray(images[i].permute(1, 2, 0).numpy()), bits)
            assert torch.equal(out[i], torch.from_numpy(np.array(pil)).permute(2, 0, 1))
    assert torch.unique(get_defense("bdr").prepare(images, gen)).tolist() == [0, 64, 128, 192]


# --- batch level --------------------------------------------------------------

@pytest.mark.parametrize("size, h, w", [(16, 32, 32), (5, 20, 28)])
def test_cutout_zeros_one_clipped_square_per_image(size, h, w, gen):
    x = torch.rand(32, 3, h, w, generator=gen) * 0.99 + 0.01  # no zeros of its own
    out = Cutout(size=size).apply(x, gen)
    zero = out == 0
    assert torch.equal(out[~zero], x[~zero])  # nothing else changes
    for i, mask in enumerate(zero):
        assert torch.equal(mask[0], mask[1]) and torch.equal(mask[0], mask[2])
        rows, cols = mask[0].any(1).nonzero()[:, 0], mask[0].any(0).nonzero()[:, 0]
        assert len(rows) > 0, f"image {i}: nothing cut"
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        box = torch.zeros(h, w, dtype=torch.bool)
        box[top:bottom, left:right] = True
        assert torch.equal(mask[0], box), f"image {i}: not a rectangle"
        for lo, hi, n in ((top, bottom, h), (left, right, w)):  # full side, or clipped by a border
            assert hi - lo == size or (hi - lo < size and (lo == 0 or hi == n)), f"image {i}: {lo}..{hi}"


def test_cutout_loss_is_cross_entropy_of_the_cut_batch(batch, model, gen):
    x, y = batch
    expected = ce(model, Cutout().apply(x, clone(gen)), y)
    loss, _ = Cutout().loss(model, x, y, gen)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, ce(model, x, y))


def mixed_ce(model, mixed, y):
    """lam-weighted cross-entropy recomputed from per-sample log-probabilities."""
    logp = model(mixed.x)[1].log_softmax(1)
    own, partner = logp.gather(1, y[:, None]), logp.gather(1, y[mixed.perm][:, None])
    return -(mixed.lam * own + (1 - mixed.lam) * partner).mean()


def test_mixup_is_a_convex_combination_with_mixed_loss(batch, model, gen):
    x, y = batch
    m = Mixup().mix(x, clone(gen))
    assert torch.equal(m.perm.sort().values, torch.arange(len(x))) and 0 <= m.lam <= 1 and m.box is None
    torch.testing.assert_close(m.x, m.lam * x + (1 - m.lam) * x[m.perm])
    loss, logits = Mixup().loss(model, x, y, gen)
    torch.testing.assert_close(loss, mixed_ce(model, m, y))
    torch.testing.assert_close(logits, model(m.x)[1])


def test_cutmix_pastes_one_box_and_weights_by_its_area(batch, model, gen):
    x, y = batch
    h, w = x.shape[2:]
    pasted = 0
    for _ in range(6):
        m = CutMix().mix(x, clone(gen))
        top, bottom, left, right = m.box
        assert 0 <= top <= bottom <= h and 0 <= left <= right <= w
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(m.x[..., inside], x[m.perm][..., inside])
        assert torch.equal(m.x[..., ~inside], x[..., ~inside])
        assert m.lam == pytest.approx(1 - inside.sum().item() / (h * w))
        loss, _ = CutMix().loss(model, x, y, gen)  # advances gen for the next round
        torch.testing.assert_close(loss, mixed_ce(model, m, y))
        pasted += 0 < inside.sum() < h * w
    assert pasted > 0


@pytest.mark.parametrize("alpha, lo, hi", [(1.0, 0.7, 0.9), (0.2, 0.2, 0.5)])
def test_mixing_weight_follows_beta_alpha(alpha, lo, hi, gen):
    # Share of lam in (0.1, 0.9): 0.8 under Beta(1, 1), ~0.35 under Beta(0.2, 0.2).
    lams = np.array([Mixup(alpha=alpha).mix(torch.zeros(2, 3, 4, 4), gen).lam for _ in range(400)])
    assert lo < ((lams > 0.1) & (lams < 0.9)).mean() < hi


@pytest.mark.parametrize("eps", [4 / 255, 8 / 255])
def test_adversarial_examples_stay_in_the_ball_and_raise_the_loss(eps, batch, model, gen):
    x, y = batch
    model.eval()  # a fixed function for the comparison
    d = get_defense("adv-train", eps=eps)
    assert d.steps == 10 and d.step_size == pytest.approx(eps / 4)
    model.zero_grad(set_to_none=True)
    x_adv = d.perturb(model, x, y, gen)
    assert all(p.grad is None for p in model.parameters())  # the attack touches no parameter gradient
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    sign = torch.randint(0, 2, x.shape, generator=gen) * 2 - 1
    with torch.no_grad():
        clean, noisy, adv = ce(model, x, y), ce(model, (x + eps * sign).clamp(0, 1), y), ce(model, x_adv, y)
    assert adv > max(clean, noisy) + 0.01, (clean, noisy, adv)


def test_adversarial_training_loss_is_cross_entropy_on_the_attack(batch, model, gen):
    x, y = batch
    d = AdversarialTraining(eps=8 / 255, steps=3, step_size=1 / 255)
    assert d.step_size == 1 / 255
    model.eval()
    expected = ce(model, d.perturb(model, x, y, clone(gen)), y)
    loss, _ = d.loss(model, x, y, gen)
    torch.testing.assert_close(loss, expected)


def _apbench_ueraser():
    """UEraser's augmentation as lafeat/apbench's defense/ueraser.py (9a6fb91) spells it."""
    import kornia.augmentation as K
    return K.AugmentationSequential(
        K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), same_on_batch=False, p=1.0,
                                 keepdim=True),
        K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=1.0),
        K.RandomChannelShuffle(same_on_batch=False, p=0.5, keepdim=True),
        K.auto.TrivialAugment(),
    )


def test_ueraser_is_the_authors_kornia_pipeline(demo, gen):
    """The augmentation is APBench's, drawn from the global generator seeded from ``gen``;
    the caller's global random state is left as it was."""
    x = demo[0].float() / 255
    seed = int(torch.randint(0, 2**62, (1,), generator=clone(gen)))
    state = torch.get_rng_state()
    out = UEraser().augment(x, gen)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(seed)
    expected = _apbench_ueraser()(x)
    torch.set_rng_state(state)
    torch.testing.assert_close(out, expected.clamp(0, 1), atol=0, rtol=0)
    # the brightness intensity the authors chose shifts every image, not just some
    assert ((out - x).abs().flatten(1).mean(1) > 0.02).all()


def test_ueraser_without_kornia_is_refused_when_built(monkeypatch, tmp_path, capsys):
    import sys
    for mod in [m for m in sys.modules if m == "kornia" or m.startswith("kornia.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "kornia", None)  # import kornia raises ImportError
    for name in UERASERS:
        with pytest.raises(ImportError, match=r"ue-fast\[kornia\]"):
            get_defense(name)
    # evaluate and report refuse it before reading or training anything; the CLI says how to get it
    from ue_fast.cli import main
    from ue_fast.data import demo_dir
    from ue_fast.evaluate.report import report
    d = demo_dir()
    with pytest.raises(ImportError, match="kornia"):
        report(d / "train", d / "train", d / "test", tmp_path / "rep", archs=["cnn-small"],
               defenses=["none", "ueraser-lite"], epochs=1)
    assert not (tmp_path / "rep").exists()
    code = main(["evaluate", "--train", str(d / "train"), "--test", str(d / "test"), "--arch", "cnn-small",
                 "--epochs", "1", "--defense", "ueraser", "--device", "cpu"])
    assert code == 2 and "pip install 'ue-fast[kornia]'" in capsys.readouterr().err


def test_ueraser_augmentations_are_strong_and_varied(batch, gen):
    x, _ = batch
    a, b = UEraser().augment(x, gen), UEraser().augment(x, gen)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.05 and (a - b).abs().mean() > 0.05


def test_ueraser_trains_on_the_worst_of_k(batch, model, gen):
    x, y = batch
    d = UEraser(repeats=4)
    twin = clone(gen)
    per, logits_k = [], []
    for _ in range(4):
        logits_k.append(model(d.augment(x, twin))[1])
        per.append(F.cross_entropy(logits_k[-1], y, reduction="none"))
    per = torch.stack(per)  # [K, B]
    worst = per.max(0)
    loss, logits = d.loss(model, x, y, gen)
    torch.testing.assert_close(loss, worst.values.mean())
    torch.testing.assert_close(logits, torch.stack(logits_k)[worst.indices, torch.arange(len(x))])
    assert loss > per.mean() + 1e-3  # the max, not the mean, over augmentations


def test_l2_adversarial_training_stays_in_the_l2_ball(batch, model, gen):
    x, y = batch
    model.eval()
    d = get_defense("adv-train", eps=0.5, norm="l2")
    assert d.step_size == pytest.approx(0.125)
    x_adv = d.perturb(model, x, y, gen)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 0.5 + 1e-5 and float(norms.min()) > 0.1
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert ce(model, x_adv, y) > ce(model, x, y) + 0.01


def test_adversarial_step_is_pgd_step(batch, model, gen):
    """One attack step equals ue_fast.pgd_step_ (maximising) from the same start, in both norms."""
    from ue_fast.ops import pgd_step_

    x, y = batch
    model.eval()
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        d = AdversarialTraining(eps=eps, steps=1, norm=norm)
        twin = clone(gen)
        if norm == "linf":
            start = (2 * torch.rand(x.shape, generator=twin) - 1) * eps
        else:
            r = torch.randn(x.shape, generator=twin)
            start = r * (min(d.step_size, eps) / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        delta = ((x + start).clamp(0, 1) - x).requires_grad_(True)
        (grad,) = torch.autograd.grad(ce(model, x + delta, y), delta)
        delta = delta.detach()
        pgd_step_(delta, grad, x, eps=eps, step_size=d.step_size, norm=norm, maximize=True)
        torch.testing.assert_close(d.perturb(model, x, y, gen), (x + delta).clamp(0, 1), atol=1e-6, rtol=0)


def test_ueraser_strengths_are_max_loss_phases(batch, model, gen):
    """ueraser-lite / ueraser / ueraser-max: the worst of K for 0 / 50 / 300 epochs, then one
    augmentation per batch (APBench's --repeat_epoch)."""
    assert [get_defense(n).max_epochs for n in UERASERS] == [0, 50, 300]
    for name, last_max in (("ueraser-lite", -1), ("ueraser", 49), ("ueraser-max", 299)):
        d = get_defense(name)
        assert d.at_epoch(last_max + 1).repeats == 1 and d.at_epoch(last_max + 1).name == name
        if last_max >= 0:
            assert d.at_epoch(last_max) is d and d.repeats == 5
    assert UEraser(max_epochs=None).at_epoch(10**6).repeats == 5
    # after the phase, the loss is the cross-entropy of one augmentation
    x, y = batch
    one = get_defense("ueraser-lite").at_epoch(0)
    expected = ce(model, one.augment(x, clone(gen)), y)
    torch.testing.assert_close(one.loss(model, x, y, gen)[0], expected)
