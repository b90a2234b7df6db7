"""op and coin against their authors' definitions on small inputs (the procedures are in the
docstrings of ue_fast/evaluate/defenses/op.py and coin.py, with the files they follow)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _helpers import demo_sets
from ue_fast.evaluate.defenses import COIN, OrthogonalProjection, get_defense
from ue_fast.evaluate.defenses.coin import ALPHAS, resample


# --- coin ---------------------------------------------------------------------

def scipy_wrap_bilinear(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.map_coordinates(img, (rows, cols), order=1, mode="wrap")`` for one 2-D
    channel, written out: a coordinate outside [0, n - 1] is moved by a multiple of n - 1
    (scipy's ``wrap``, not ``grid-wrap``), then interpolated between its two neighbours."""
    h, w = img.shape

    def wrap(c, n):
        if n == 1:
            return 0.0
        if c < 0:
            return c + (n - 1) * (math.floor(-c / (n - 1)) + 1)
        if c > n - 1:
            return c - (n - 1) * math.floor(c / (n - 1))
        return c

    out = np.zeros(rows.shape, dtype=np.float64)
    for idx in np.ndindex(rows.shape):
        r, c = wrap(float(rows[idx]), h), wrap(float(cols[idx]), w)
        r0, c0 = math.floor(r), math.floor(c)
        fr, fc = r - r0, c - c0
        r1, c1 = min(r0 + 1, h - 1), min(c0 + 1, w - 1)
        out[idx] = ((1 - fr) * ((1 - fc) * img[r0, c0] + fc * img[r0, c1])
                    + fr * ((1 - fc) * img[r1, c0] + fc * img[r1, c1]))
    return out


@pytest.mark.parametrize("h, w, alpha", [(8, 8, 2.0), (5, 7, 3.2), (1, 4, 2.0), (6, 3, 0.8)])
def test_resample_is_scipy_wrap_bilinear(h, w, alpha, gen):
    img = torch.rand(2, 3, h, w, generator=gen, dtype=torch.float64)
    dy = (torch.rand(2, h, w, generator=gen, dtype=torch.float64) * 2 - 1) * alpha
    dx = (torch.rand(2, h, w, generator=gen, dtype=torch.float64) * 2 - 1) * alpha
    ours = resample(img, dy, dx)
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for b in range(2):
        for ch in range(3):
            ref = scipy_wrap_bilinear(img[b, ch].numpy(), i + dy[b].numpy(), j + dx[b].numpy())
            np.testing.assert_allclose(ours[b, ch].numpy(), ref, atol=1e-12)


def test_resample_agrees_with_scipy_itself(gen):
    """The authors' call, where SciPy is installed (it is not a dependency: the test above
    checks the same definition without it)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    h, w, alpha = 9, 11, 2.0
    img = torch.rand(h, w, 3, generator=gen)  # their layout: H x W x C, float32
    dx = (torch.rand(h, w, generator=gen) * 2 - 1) * alpha
    dy = (torch.rand(h, w, generator=gen) * 2 - 1) * alpha
    xg, yg, zg = np.meshgrid(np.arange(w), np.arange(h), np.arange(3))  # as train.py L44-47
    coords = (yg + dy.numpy()[..., None]).reshape(-1, 1), (xg + dx.numpy()[..., None]).reshape(-1, 1), zg.reshape(-1, 1)
    ref = ndimage.map_coordinates(img.numpy(), coords, order=1, mode="wrap").reshape(h, w, 3)
    ours = resample(img.permute(2, 0, 1)[None], dy[None], dx[None])[0].permute(1, 2, 0)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)


def test_coin_displaces_by_its_severity_clips_and_truncates(gen):
    x = torch.rand(4, 3, 12, 10, generator=gen)
    for severity in (1, 4, 7):
        d = COIN(severity=severity)
        assert d.alpha == ALPHAS[severity - 1] == pytest.approx(0.4 + 0.4 * severity)
        twin = torch.Generator()
        twin.set_state(gen.get_state())
        out = d.apply(x, gen)
        dx = (torch.rand(4, 12, 10, generator=twin) * 2 - 1) * d.alpha  # their order: dx, then dy
        dy = (torch.rand(4, 12, 10, generator=twin) * 2 - 1) * d.alpha
        expected = (resample(x.double(), dy.double(), dx.double()).clamp(0, 1) * 255).floor() / 255
        mismatch = (out.double() - expected).abs()
        assert mismatch.max() <= 1 / 255 + 1e-6 and (mismatch > 1e-6).float().mean() < 1e-3
        assert torch.equal(out * 255, (out * 255).round())  # 8-bit values
        assert dx.abs().max() <= d.alpha and dx.abs().max() > 0.9 * d.alpha


def test_coin_loss_is_cross_entropy_of_the_resampled_batch(gen):
    from ue_fast.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn-small", 10)
    x, y = torch.rand(6, 3, 32, 32, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    twin = torch.Generator()
    twin.set_state(gen.get_state())
    loss, _ = COIN().loss(model, x, y, gen)
    torch.testing.assert_close(loss, F.cross_entropy(model(COIN().apply(x, twin))[1], y))


# --- op -----------------------------------------------------------------------

def test_op_fit_is_their_sgd_on_a_bias_free_linear_model(gen):
    """Step 1 as ``orthogonal_projection_step_1.py`` runs it: nn.Linear(D, C, bias=False) from
    its default init, SGD(lr 0.1), MultiStepLR at [E/2, 3E/4], batches of 1,024 in order."""
    n, classes = 2100, 4  # three batches, the last one short
    images = torch.randint(0, 256, (n, 3, 4, 4), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=gen)
    op = OrthogonalProjection(epochs=8)
    twin = torch.Generator()
    twin.set_state(gen.get_state())
    w = op.fit(images, labels, gen)

    d = 3 * 4 * 4
    fc = torch.nn.Linear(d, classes, bias=False)
    with torch.no_grad():  # nn.Linear's init is U(-1/sqrt(D), 1/sqrt(D)); drawn from our generator
        fc.weight.copy_((torch.rand(classes, d, generator=twin) * 2 - 1) / math.sqrt(d))
    opt = torch.optim.SGD(fc.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4, 6], gamma=0.1)
    x = images.float().div(255).flatten(1)
    for _ in range(8):
        for i in range(0, n, 1024):
            opt.zero_grad()
            F.cross_entropy(fc(x[i:i + 1024]), labels[i:i + 1024]).backward()
            opt.step()
        sched.step()
    torch.testing.assert_close(w, fc.weight.detach(), atol=1e-5, rtol=1e-5)


def test_op_projection_is_their_sequential_qr_projection(gen):
    """``utils_projection.py``: rows of W normalised, Q from numpy's QR of W^T, then each
    orthonormal direction subtracted in turn."""
    w = torch.randn(10, 48, generator=gen, dtype=torch.float64) * torch.rand(10, 1, generator=gen, dtype=torch.float64)
    x = torch.rand(30, 48, generator=gen, dtype=torch.float64)
    ours = OrthogonalProjection.project(x.float(), OrthogonalProjection.basis(w.float()))
    wn = (w / w.norm(dim=1, keepdim=True)).numpy()
    q, _ = np.linalg.qr(wn.T)
    ref = x.numpy().copy()
    for row in q.T:
        ref -= (ref @ row)[:, None] * row[None, :]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    # nothing is left along any class direction
    assert (ours.double() @ torch.from_numpy(wn).T).abs().max() < 1e-4


def test_op_removes_a_class_wise_shortcut():
    """The 1,000 demo images carrying a class-wise +-8/255 pattern (an LSP/OPS-like shortcut).
    Signal: the mean over images of the component along its own class's pattern minus the mean
    component along the others', in units of the pattern (1: the whole pattern is there, 0: no
    class-wise trace). Measured: clean 0.035, poisoned 1.016, after op -0.093 (and with the
    authors' 20 steps at this size, 0.26 of the patterns' norm lay in the fit's span: see
    ``fit_epochs``). Images stay 8-bit; labels and order unchanged."""
    train, _ = demo_sets()
    g = torch.Generator().manual_seed(0)
    patterns = (torch.randint(0, 2, (10, 3, 32, 32), generator=g) * 2 - 1) * 8
    poisoned = (train.images.int() + patterns[train.labels]).clamp(0, 255).to(torch.uint8)
    labels = train.labels.clone()
    p = patterns.flatten(1).float()

    def signal(images):
        s = images.float().flatten(1) @ p.T / p.norm(dim=1) ** 2  # [N, 10]
        own = s[torch.arange(len(s)), train.labels]
        return (own - (s.sum(1) - own) / 9).mean().item()

    op = get_defense("op")
    assert op.fit_epochs(1000) == 980 and op.fit_epochs(50_000) == 20
    assert OrthogonalProjection(epochs=3).fit_epochs(10) == 3
    out = op.prepare(poisoned, torch.Generator().manual_seed(1), labels)
    before, after = signal(poisoned), signal(out)
    print(f"class-wise signal: clean {signal(train.images):.3f}, poisoned {before:.3f}, after op {after:.3f}")
    assert before > 0.9 and abs(after) < 0.25
    assert out.dtype == torch.uint8 and torch.equal(labels, train.labels)


# --- dvae ---------------------------------------------------------------------

def their_train_batch_loss(images, rec, perturbation, mu, log_var, kld_target, epoch):
    """main_vae_disentangle.py's train_batch, L180-205, transcribed (the logged-only terms left out)."""
    loss_rec = F.mse_loss(rec, images)
    loss_rec_p = F.mse_loss((rec + perturbation).clamp(0, 1), images)
    loss_p = F.mse_loss(perturbation, torch.zeros_like(perturbation))
    kld_weight = 0.01 if kld_target > 0.99 else 0.5
    kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=(0, 1, 2))
    loss = loss_rec + loss_rec_p + kld_weight * max(kld_loss, kld_target)
    if epoch > 10:
        loss = loss + max(loss_p, 0.002)
    return loss


@pytest.mark.parametrize("tau, epoch", [(1.0, 3), (3.0, 11), (1.0, 40)])
def test_dvae_loss_is_their_train_batch(tau, epoch, gen):
    from ue_fast.evaluate.defenses.dvae import DVAEPurification, dvae_loss

    x = torch.rand(4, 3, 8, 8, generator=gen)
    rec, p = torch.rand(4, 3, 8, 8, generator=gen), 0.1 * torch.randn(4, 3, 8, 8, generator=gen)
    for scale in (0.01, 3.0):  # KL below and above the floor
        mu, log_var = scale * torch.randn(4, 16, 4, 4, generator=gen), scale * torch.randn(4, 16, 4, 4, generator=gen)
        penalise = epoch >= DVAEPurification().penalty_from()
        torch.testing.assert_close(dvae_loss(x, rec, p, mu, log_var, tau, penalise),
                                   their_train_batch_loss(x, rec, p, mu, log_var, tau, epoch))


def test_dvae_is_their_architecture():
    """ResNetDVAE at stem_end_block 7, latent 256: h 128 x H/2 x W/2, a 256-channel latent, two
    decoders of their layers, the class embedding a 128 x H/2 x W/2 map; odd sizes cropped back."""
    from ue_fast.evaluate.defenses.dvae import DVAE

    for h, w in ((32, 32), (17, 20)):
        vae = DVAE(10, h, w)
        x, y = torch.rand(2, 3, h, w), torch.tensor([1, 7])
        rec, p, mu, log_var = vae(x, y)
        assert rec.shape == p.shape == x.shape and mu.shape == log_var.shape == (2, 256, (h + 1) // 2, (w + 1) // 2)
        assert 0 <= rec.min() and rec.max() <= 1
    assert [type(m).__name__ for m in vae.decoder] == ["ConvTranspose2d", "ConvTranspose2d", "InstanceNorm2d", "ReLU",
                                                        "ConvTranspose2d", "InstanceNorm2d", "ReLU", "ConvTranspose2d",
                                                        "Sigmoid"]
    assert [type(m).__name__ for m in vae.decoder_p] == [type(m).__name__ for m in vae.decoder][:-1]
    assert [type(m).__name__ for m in vae.stem] == ["Conv2d", "BatchNorm2d", "ReLU", "BasicBlock", "BasicBlock",
                                                     "BasicBlock"]
    assert vae.emb_p.weight.shape == (10, 128 * 9 * 10)


def test_dvae_purifies_in_two_stages(monkeypatch, gen):
    """Stage 1: clamp(x - p) truncated to 8 bits; stage 2: the reconstruction of clamp(x1 - p),
    each with its own freshly trained VAE (tau 1, then 3); labels read, never changed."""
    from ue_fast.evaluate.defenses import dvae as mod

    calls = []

    class Stub(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, x, y, gen=None):
            p = torch.full_like(x, self.shift)
            return (x * 0.5).clamp(0, 1), p, None, None

    def train_vae(self, images, labels, tau, g):
        calls.append((tau, images.clone()))
        return Stub(0.1 if tau == 1.0 else 0.2), None

    monkeypatch.setattr(mod.DVAEPurification, "train_vae", train_vae)
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.arange(6) % 3
    kept = labels.clone()
    out = mod.DVAEPurification(epochs=1).prepare(images, gen, labels)
    once = ((images.float() / 255 - 0.1).clamp(0, 1) * 255).to(torch.uint8)
    twice = (((once.float() / 255 - 0.2).clamp(0, 1) * 0.5) * 255).to(torch.uint8)
    assert [c[0] for c in calls] == [1.0, 3.0] and torch.equal(calls[0][1], images) and torch.equal(calls[1][1], once)
    assert torch.equal(out, twice) and torch.equal(labels, kept)


def test_defense_options_reach_evaluate_and_report(tmp_path, capsys):
    """--defense-option DEFENSE.KEY=VALUE: the option reaches the defence (in the results'
    settings and a report cell's fingerprint); a bad one is refused before anything runs."""
    import json

    from _helpers import demo_subset
    from ue_fast.cli import main as cli_main

    train = demo_subset(tmp_path / "train", per_class=6)
    test = demo_subset(tmp_path / "test", per_class=2, split="test")
    base = ["evaluate", "--train", str(train), "--test", str(test), "--arch", "cnn-small", "--epochs", "1",
            "--device", "cpu", "--no-progress"]
    out = tmp_path / "r.json"
    assert cli_main(base + ["--defense", "dvae", "--defense-option", "dvae.epochs=1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["defense_options"] == {"epochs": 1}
    capsys.readouterr()
    for bad, text in ((["--defense", "coin", "--defense-option", "coin.alpha=2"], "'alpha'"),
                      (["--defense", "coin", "--defense-option", "dvae.epochs=1"], "not the --defense coin"),
                      (["--defense", "coin", "--defense-option", "coin.severity=9"], "severity"),
                      (["--defense", "jpeg", "--defense-option", "jpeg.quality=50"], "--jpeg-quality"),
                      (["--defense", "coin", "--defense-option", "severity=2"], "DEFENSE.KEY=VALUE")):
        assert cli_main(base + bad) == 2
        assert text in capsys.readouterr().err, bad
    rep = tmp_path / "rep"
    args = ["report", str(train), "--clean", str(train), "--test", str(test), "--out", str(rep), "--archs", "cnn-small",
            "--defenses", "coin", "--defense-option", "coin.severity=1", "--epochs", "1", "--device", "cpu",
            "--no-progress"]
    assert cli_main(args) == 0
    cell = json.loads((rep / "cells" / "protected_cnn-small_coin_r1.json").read_text())
    assert cell["fingerprint"]["defense_options"] == {"severity": 1}
    assert cell["results"]["settings"]["defense_options"] == {"severity": 1}
    assert cli_main(args[:-7] + ["--defense-option", "dvae.epochs=1", "--epochs", "1", "--device", "cpu"]) == 2
    assert "not among the report's defenses" in capsys.readouterr().err
