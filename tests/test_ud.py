"""The unlearnable distance (``ue_fast.evaluate.ud``): the batched sharpness-aware learnability against
the one-copy-at-a-time definition, the threshold, the ratio, and ``evaluate --ud``."""
import json

import pytest
import torch
from torch import nn

import ue_fast
from _helpers import demo_subset
from ue_fast.cli import main as cli_main
from ue_fast.evaluate.ud import (layer_sharpness, layer_sharpness_reference, sharpness_layers, subset,
                                 two_means_midpoint, unlearnable_distance)
from ue_fast.models import build_model


def _data(n=24, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8),
            torch.randint(0, classes, (n,), generator=gen))


@pytest.mark.parametrize("augment, group", [(True, None), (False, 10), (True, 3)])
def test_batched_equals_the_definition(augment, group):
    """Every layer's copies batched under vmap (in groups of 2, all 10, or 3 that split a layer's pair)
    give the loop of the definition's values, on fresh random data and weights."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = build_model("cnn-small", 3).eval()
    x, y = _data(seed=int(torch.randint(0, 2**31, ())))
    opts = dict(iters=2, batch_size=8, lr=0.5, rho=0.05, seed=3, augment=augment)
    fast = layer_sharpness(model, x, y, group=group, **opts)
    ref = layer_sharpness_reference(model, x, y, **opts)
    assert fast.shape == (5,) and (ref > 0).all()
    # float32: the batched copies' convolutions sum in another order than the loop's, and two SGD
    # steps at lr 0.5 amplify it (a max-pool tie may flip): up to 3.5e-3 relative over 40 draws (one CI
    # draw failed the earlier 1e-4); a wrong layer, step or projection moves a value by far more
    torch.testing.assert_close(fast, ref, rtol=1e-2, atol=1e-5)


def test_leaves_the_model_as_it_was():
    model = build_model("cnn-small", 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    layer_sharpness(model, x, y, iters=1, batch_size=12)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_ball_bounds_the_change():
    """rho -> 0 leaves no room: SAL -> 0; a larger ball lets every layer move the loss more."""
    model = build_model("cnn-small", 3)
    x, y = _data()
    opts = dict(iters=2, batch_size=12, lr=0.5, augment=False)
    tiny = layer_sharpness(model, x, y, rho=1e-7, **opts)
    small = layer_sharpness(model, x, y, rho=0.01, **opts)
    large = layer_sharpness(model, x, y, rho=0.2, **opts)
    assert tiny.abs().max() < 1e-4
    assert (large >= small - 1e-6).all() and large.sum() > small.sum() > tiny.sum()


def test_layers_are_conv_and_linear_weights():
    assert sharpness_layers(build_model("cnn-small", 10)) == [
        "features.0.weight", "features.4.weight", "features.8.weight", "features.11.weight", "classifier.weight"]
    names = sharpness_layers(build_model("resnet18", 10))
    assert len(names) == 21 and names[-1] == "fc.weight"  # 17 convs, 3 shortcuts, the head (as the authors')
    assert all(n.endswith("weight") for n in sharpness_layers(build_model("vit-small", 10)))


def test_two_means_midpoint_is_the_best_split():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.rand(int(torch.randint(2, 12, (), generator=gen)), generator=gen, dtype=torch.float64)
        best = None
        s = v.sort().values
        for k in range(1, len(s)):  # every split of the sorted values
            a, b = s[:k], s[k:]
            sse = float(((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum())
            if best is None or sse < best[0] - 1e-12:
                best = (sse, float((a.mean() + b.mean()) / 2))
        assert two_means_midpoint(v) == pytest.approx(best[1])
    assert two_means_midpoint([0.1, 0.2, 0.15, 2.0, 2.2]) == pytest.approx((0.15 + 2.1) / 2)
    assert two_means_midpoint([3.0, 3.0]) == 3.0


def test_unlearnable_distance_counts_over_epochs():
    # per-epoch midpoints: (0 + 2) / 2 = 1 and, the best split being {0, 1, 1} | {3}, (2/3 + 3) / 2
    clean = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 1.0, 1.0, 3.0]])
    protected = torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    r = unlearnable_distance(protected, clean)
    assert r["threshold"] == pytest.approx((1 + 11 / 6) / 2)
    assert r["learnable_per_epoch"] == {"clean": 1.5, "protected": 0.5}  # (2 + 1) / 2 and (1 + 0) / 2
    assert r["ud"] == pytest.approx(1 / 3) and r["num_layers"] == 4
    assert unlearnable_distance(clean, clean)["ud"] == 1
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert unlearnable_distance(protected, torch.zeros(2, 4))["ud"] is None
    with pytest.raises(ValueError, match="same layers"):
        unlearnable_distance(protected, clean[:, :3])


def test_subset_is_class_balanced_and_seeded():
    y = torch.arange(100) % 4
    a, b = subset(y, 40, seed=1), subset(y, 40, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, subset(y, 40, seed=2))
    assert torch.bincount(y[a]).tolist() == [10, 10, 10, 10] and len(set(a.tolist())) == 40
    assert torch.equal(subset(y, None), torch.arange(100)) and torch.equal(subset(y, 500), torch.arange(100))


def test_evaluate_ud_end_to_end(tmp_path, capsys):
    """`ue-fast evaluate --ud`: SAL per epoch and layer for the victim on the protected data and one on
    their clean counterparts (the input the manifest names), the threshold, and the figure."""
    train = demo_subset(tmp_path / "train", ("airplane", "cat", "ship"), 8)
    test = demo_subset(tmp_path / "test", ("airplane", "cat", "ship"), 4, "test")
    prot = tmp_path / "prot"
    ue_fast.protect(train, prot, arch="cnn-small", epochs=1, pgd_steps=1, batch_size=8, poison_batch_size=24,
                    progress=False, device="cpu")
    out = tmp_path / "r.json"
    assert cli_main(["evaluate", "--train", str(prot), "--test", str(test), "--arch", "cnn-small", "--epochs", "2",
                     "--batch-size", "12", "--ud", "--ud-samples", "12", "--ud-iters", "2", "--device", "cpu",
                     "--no-progress", "--out", str(out)]) == 0
    assert "unlearnable distance" in capsys.readouterr().out
    u = json.loads(out.read_text())["ud"]
    assert len(u["layers"]) == 5 and u["settings"]["samples"] == 12 and u["settings"]["iters"] == 2
    for run in ("protected", "clean"):
        assert len(u["sal"][run]) == 2 and all(len(row) == 5 and min(row) >= 0 for row in u["sal"][run])
    again = unlearnable_distance(torch.tensor(u["sal"]["protected"]), torch.tensor(u["sal"]["clean"]))
    assert again["ud"] == u["ud"] and again["threshold"] == u["threshold"]
    assert len(u["clean_run"]["test_acc"]) == 2
    with pytest.raises(ValueError, match="ud_iters"):
        ue_fast.evaluate(prot, test, arch="cnn-small", epochs=1, ud=True, ud_iters=0, progress=False)
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--train", str(prot), "--test", str(test), "--ud-samples", "1"])


def test_sharpness_of_a_linear_model_by_hand():
    """One linear layer, no augmentation, one full batch: descent is plain gradient descent on W
    projected into the ball, written out here without the library's helpers."""
    torch.manual_seed(0)

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 3)

        def forward(self, x):
            f = x.flatten(1)
            return f, self.fc(f)

    model = Lin()
    x, y = _data(n=16)
    rho, lr, iters = 0.05, 2.0, 3
    w0 = model.fc.weight.detach().clone()
    xf = x.float().div(255)  # the single batch: the order does not matter for a mean loss
    loss = lambda w: nn.functional.cross_entropy(xf.flatten(1) @ w.T + model.fc.bias.detach(), y)  # noqa: E731
    origin = float(loss(w0))
    ext = {}
    for sign in (1, -1):
        w, best = w0.clone(), origin
        for _ in range(iters):
            w.requires_grad_(True)
            (g,) = torch.autograd.grad(loss(w), [w])
            w = w.detach() - sign * lr * g
            d = w - w0
            if d.norm() > rho * w0.norm():
                d = d * (rho * w0.norm() / d.norm())
            w = w0 + d
            best = min(best, float(loss(w))) if sign == 1 else max(best, float(loss(w)))
        ext[sign] = best
    expected = max(ext[-1] - origin, origin - ext[1])
    got = layer_sharpness(model, x, y, rho=rho, lr=lr, iters=iters, batch_size=16, augment=False)
    assert got.shape == (1,) and float(got[0]) == pytest.approx(expected, rel=1e-4)


def test_ud_reference_of_other_settings_is_refused(tmp_path):
    train = demo_subset(tmp_path / "train", ("airplane", "cat"), 6)
    test = demo_subset(tmp_path / "test", ("airplane", "cat"), 3, "test")
    kw = dict(arch="cnn-small", epochs=1, batch_size=12, device="cpu", progress=False, ud=True, ud_samples=12,
              ud_iters=1)
    clean = ue_fast.evaluate(train, test, ud_reference="self", **kw)
    assert clean["ud"]["ud"] == 1
    again = ue_fast.evaluate(train, test, ud_reference=clean["ud"], **kw)
    assert again["ud"]["sal"]["clean"] == clean["ud"]["sal"]["clean"]
    with pytest.raises(ValueError, match="another run"):
        ue_fast.evaluate(train, test, ud_reference=clean["ud"], **{**kw, "ud_iters": 2})


@pytest.mark.gpu
def test_batched_equals_the_definition_on_cuda():
    """On a GPU, in the victim's channels-last layout, all copies batched at once."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10).cuda().to(memory_format=torch.channels_last).eval()
    x, y = _data(n=64, classes=10)
    layers = sharpness_layers(model)[::5]
    opts = dict(iters=2, batch_size=32, seed=1)
    fast = layer_sharpness(model, x.cuda(), y.cuda(), layers, group=2 * len(layers), **opts)
    ref = layer_sharpness_reference(model, x.cuda(), y.cuda(), layers, **opts)
    # cuDNN's TF32 convolutions round differently batched and one by one: loose, yet far below a wrong copy
    torch.testing.assert_close(fast, ref, rtol=1e-2, atol=1e-3)
