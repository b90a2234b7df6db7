"""--robust (ue_fast.methods.robust, ue_fast.generation.defended): each differentiable defence
against the defence of the same name in the registry, their gradients, the per-image draws, and
the wrapper through protect (settings, refusals, resume)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import demo_sets, demo_subset, protect_killed_after_checkpoint

import ue_fast
from ue_fast.evaluate.defenses import get_defense
from ue_fast.generation.batches import Draws
from ue_fast.generation.defended import (BDR_BITS, EOT, JPEG_QUALITIES, ROBUST, RobustSettings, bdr, check_robust,
                                        grayscale, jpeg)

pytest.importorskip("kornia")

SHORT = dict(arch="cnn-small", epochs=2, pgd_steps=2, batch_size=16, poison_batch_size=32, progress=False,
             device="cpu")


@pytest.fixture(scope="module")
def images():
    """64 demo training images, uint8 [64, 3, 32, 32], perturbed by +-8 grey levels as a protection is."""
    train, _ = demo_sets()
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(-8, 9, train.images[:64].shape, generator=g, dtype=torch.int16)
    return (train.images[:64].to(torch.int16) + noise).clamp(0, 255).to(torch.uint8)


def _u_for(level: int, lo: int, hi: int, n: int) -> torch.Tensor:
    """Uniform draws that give ``level`` in [lo, hi] for every image."""
    return torch.full((n,), (level - lo + 0.5) / (hi - lo + 1))


def test_grayscale_is_the_registry_s_before_its_8_bit_rounding(images):
    ours = grayscale(images.float() / 255) * 255
    theirs = get_defense("grayscale").prepare(images, torch.Generator()).float()
    assert (ours - theirs).abs().max() <= 0.5 + 1e-4  # Pillow rounds the same luma to a grey level
    assert torch.equal(ours[:, 0], ours[:, 1]) and torch.equal(ours[:, 1], ours[:, 2])


@pytest.mark.parametrize("bits", range(BDR_BITS[0], BDR_BITS[1] + 1))
def test_bdr_is_the_registry_s_exactly(images, bits):
    ours = bdr(images.float() / 255, _u_for(bits, *BDR_BITS, len(images))) * 255
    theirs = get_defense("bdr", bits=bits).prepare(images, torch.Generator()).float()
    assert torch.allclose(ours, theirs, atol=1e-3)


def test_jpeg_at_the_registry_s_quality_is_within_what_jpeg_itself_changes(images):
    """kornia's codec against Pillow's at quality 10 (ISS's): their difference is a small part
    of what the JPEG round trip changes (the rounding of DCT coefficients near a quantisation
    boundary, and the chroma filters, differ), and at quality 90 they nearly agree."""
    x = images.float() / 255
    assert JPEG_QUALITIES[0] == 10
    for quality, share in ((10, 0.35), (90, 0.8)):
        ours = jpeg(x, _u_for(quality, 10, 90, len(x)), qualities=(10, 90))
        theirs = get_defense("jpeg", quality=quality).prepare(images, torch.Generator()).float() / 255
        changed = (theirs - x).abs().mean()
        assert (ours - theirs).abs().mean() <= share * changed, quality
        assert (ours - x).abs().mean() == pytest.approx(float(changed), rel=0.25)  # as strong a defence


@pytest.mark.parametrize("name", list(ROBUST))
def test_every_form_has_a_useful_gradient(images, name):
    x = (images.float() / 255).requires_grad_(True)
    u = torch.rand(len(x), generator=torch.Generator().manual_seed(1))
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (ROBUST[name](x, u) * w).sum().backward()
    g = x.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    if name == "bdr":  # straight through: the identity's gradient
        assert torch.equal(g, w)
    if name == "grayscale":  # the luma weights, per channel, of the three channels' upstream sum
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        assert torch.allclose(g, w.sum(1, keepdim=True) * luma, atol=1e-5)


def test_eot_draws_a_defence_per_image_reproducibly(images):
    x = images.float() / 255
    eot = EOT(["grayscale", "jpeg", "bdr"], RobustSettings(share=0.75))  # none as likely as each defence
    assert eot.names == ("jpeg", "grayscale", "bdr")  # kept in the registry's order
    assert eot.names == ("jpeg", "grayscale", "bdr")
    a = eot(x, Draws(torch.Generator().manual_seed(3)))
    b = eot(x, Draws(torch.Generator().manual_seed(3)))
    assert torch.equal(a, b)
    u = torch.rand(len(x), 2, generator=torch.Generator().manual_seed(3))
    which = torch.floor(u[:, 0] * 4).long()
    assert set(which.tolist()) == {0, 1, 2, 3}  # none and each defence, at 64 images
    for k in range(4):
        rows = which == k
        expect = x[rows] if k == 0 else ROBUST[eot.names[k - 1]](x[rows], u[rows, 1])
        assert torch.allclose(a[rows], expect, atol=1e-6), k


def test_eot_share_and_ranges_set_what_is_drawn(images):
    """share: the probability of a defence (none below 1 - share, then each defence in equal
    parts); jpeg_quality and bdr_bits: the ranges their parameter is drawn from."""
    x = images.float() / 255
    eot = EOT(["jpeg", "bdr"], RobustSettings.from_dict({"share": "0.25", "jpeg_quality": "10-30", "bdr_bits": 3}))
    a = eot(x, Draws(torch.Generator().manual_seed(4)))
    u = torch.rand(len(x), 2, generator=torch.Generator().manual_seed(4))
    which = torch.where(u[:, 0] < 0.75, 0, torch.where(u[:, 0] < 0.875, 1, 2))
    assert set(which.tolist()) == {0, 1, 2}
    assert torch.equal(a[which == 0], x[which == 0])
    j = which == 1
    assert torch.allclose(a[j], jpeg(x[j], u[j, 1], qualities=(10, 30)), atol=1e-6)
    assert not torch.allclose(a[j], jpeg(x[j], u[j, 1], qualities=(40, 90)), atol=1e-3)  # other qualities
    b = which == 2
    assert torch.equal(a[b], bdr(x[b], torch.zeros(int(b.sum())), bits=(3, 3)))
    always = EOT(["grayscale"], RobustSettings(share=1.0))(x, Draws(torch.Generator().manual_seed(5)))
    assert torch.allclose(always, grayscale(x))


@pytest.mark.parametrize("values, text", [
    ({"share": 0}, "share is a probability"), ({"share": "half"}, "share is a probability"),
    ({"surrogate": "maybe"}, "surrogate is true or false"), ({"jpeg_quality": "30-10"}, "jpeg_quality is a range"),
    ({"jpeg_quality": "0-50"}, "within 1-100"), ({"bdr_bits": "2-8"}, "within 1-7"), ({"shares": 1}, "no setting"),
])
def test_robust_settings_are_checked(values, text):
    with pytest.raises(ValueError, match=text):
        RobustSettings.from_dict(values)


def test_robust_settings_reach_the_run_and_its_manifest(tmp_path):
    """surrogate=true trains the surrogate on defended inputs too ("defences" time), another
    result than the default's (PGD passes only); the manifest keeps every setting; robust
    settings without robust are refused."""
    src = demo_subset(tmp_path / "in", per_class=4)
    kw = dict(SHORT, robust="jpeg")
    with pytest.warns(UserWarning):
        m = ue_fast.protect(src, tmp_path / "pgd_only", robust_settings={"jpeg_quality": "10-90", "share": 1}, **kw)
        both = ue_fast.protect(src, tmp_path / "both", robust_settings={"jpeg_quality": (10, 90), "share": 1,
                                                                        "surrogate": "true"}, **kw)
    assert m["settings"]["robust_settings"] == {"share": 1.0, "surrogate": False, "jpeg_quality": [10, 90],
                                                "bdr_bits": list(BDR_BITS)}
    assert both["settings"]["robust_settings"]["surrogate"] is True
    assert "defences" not in m["timings_s"] and "defences" in both["timings_s"]
    assert not np.array_equal(np.load(tmp_path / "pgd_only" / "perturbation_int8.npy"),
                              np.load(tmp_path / "both" / "perturbation_int8.npy"))
    with pytest.raises(ValueError, match="without robust"):
        ue_fast.protect(src, tmp_path / "none", robust_settings={"share": 0.5}, **SHORT)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("names, text", [
    ("", "names the defences"), ("jpeg,nope", "unknown defence 'nope'"),
    ("cutout", "no differentiable form.*jpeg, grayscale, bdr"), (["jpeg", "jpeg"], "twice"),
])
def test_robust_names_are_checked(names, text):
    with pytest.raises(ValueError, match=text):
        check_robust(names)


def test_robust_runs_through_protect_and_resumes_to_the_same_result(tmp_path, monkeypatch):
    src = demo_subset(tmp_path / "in")
    kw = dict(SHORT, robust="jpeg,grayscale", checkpoint_every=0)
    from ue_fast.methods.robust import RobustExperimentalWarning

    with pytest.warns(RobustExperimentalWarning, match="less than half"):  # until a configuration works
        m = ue_fast.protect(src, tmp_path / "whole", **kw)
    assert m["settings"]["robust"] == ["jpeg", "grayscale"] and m["budget"]["holds"]
    assert m["settings"]["robust_settings"] == {"share": 0.5, "surrogate": False, "jpeg_quality": [10, 30],
                                                "bdr_bits": [2, 4]}
    assert "defences" not in m["timings_s"]  # by default the surrogate trains on undefended inputs
    plain = ue_fast.protect(src, tmp_path / "plain", **SHORT)
    assert plain["settings"]["robust"] is None
    whole = np.load(tmp_path / "whole" / "perturbation_int8.npy")
    assert not np.array_equal(whole, np.load(tmp_path / "plain" / "perturbation_int8.npy"))
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=1, **kw)
    resumed = ue_fast.protect(src, tmp_path / "split", resume=True, **kw)
    assert resumed["resumed_from_epoch"] == 1
    assert np.array_equal(np.load(tmp_path / "split" / "perturbation_int8.npy"), whole)
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "mixed", die_at=1, **SHORT)
    with pytest.raises(ValueError, match="robust"):  # a checkpoint of the plain method is not this run's
        ue_fast.protect(src, tmp_path / "mixed", resume=True, **kw)


@pytest.mark.parametrize("method, text", [("ops", "training-free"), ("sep", "ensemble"), ("bayes", "whole-set")])
def test_robust_is_refused_where_it_cannot_apply(tmp_path, method, text):
    src = demo_subset(tmp_path / "in", per_class=2)
    with pytest.raises(ValueError, match=text):
        ue_fast.protect(src, tmp_path / "out", method=method, robust="jpeg", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_robust_set(tmp_path, capsys):
    """--robust-set KEY=VALUE (repeatable) reaches the manifest; a malformed one is refused before
    anything is written."""
    import json

    from ue_fast.cli import main

    src = demo_subset(tmp_path / "in", per_class=2)
    flags = ["--method", "miue", "--arch", "cnn-small", "--epochs", "1", "--pgd-steps", "1", "--batch-size", "8",
             "--device", "cpu", "--no-progress", "--robust", "grayscale,bdr"]
    assert main(["protect", str(src), str(tmp_path / "out"), *flags, "--robust-set", "share=1",
                 "--robust-set", "bdr-bits=2-3", "--robust-set", "surrogate=no", "--robust-set", "jpeg_quality=10-90"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["settings"]["robust"] == ["grayscale", "bdr"]
    assert m["settings"]["robust_settings"] == {"share": 1.0, "surrogate": False, "jpeg_quality": [10, 90],
                                                "bdr_bits": [2, 3]}
    assert main(["protect", str(src), str(tmp_path / "bad"), *flags, "--robust-set", "share"]) == 2
    assert "--robust-set takes KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
