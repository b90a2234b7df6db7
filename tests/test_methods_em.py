"""EM and class-wise EM (``ue_fast.methods.em``): the stopping rule, the shared class-wise
perturbation and the authors' settings. The protection on a victim is tested with the other
methods' in ``test_methods_work_16px.py``.

The contract every method keeps (budget, determinism, resume, manifest) is in
``test_methods_contract.py``.
"""
import json

import pytest
import torch

import ue_fast
from _helpers import demo_subset as _subset
from ue_fast.data import read_image_folder
from ue_fast.data.exports import load_delta_npy
from ue_fast.methods.em import EMClasswiseConfig, EMConfig

FAST = dict(arch="cnn-small", epochs=2, pgd_steps=2, batch_size=16, poison_batch_size=32, progress=False,
            device="cpu")
TINY = dict(train_steps=2, stop_acc=1.0)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _subset(tmp_path_factory.mktemp("in"))


@pytest.fixture(scope="module")
def runs(src, tmp_path_factory):
    out = {}
    for name in ("em", "em-classwise"):
        o = tmp_path_factory.mktemp(name) / "protected"
        out[name] = (o, ue_fast.protect(src, o, method=name, eps=8, **FAST, **TINY))
    return out


def test_em_stops_when_stop_acc_is_reached(runs, src, tmp_path):
    m = ue_fast.protect(src, tmp_path / "o", method="em", eps=8, **dict(FAST, epochs=5), train_steps=2, stop_acc=0.0)
    assert len(m["history"]) == 1, "stop_acc=0 is reached after the first round"
    h = m["history"][0]
    assert h["finished"] is True and 0.0 <= h["poisoned_acc"] <= 1.0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["history"][0]["finished"] is True
    # with an unreachable criterion every round runs, each recording the accuracy it checked
    hist = runs["em"][1]["history"]
    assert [h["finished"] for h in hist] == [False, False] and all(h["poisoned_acc"] < 1.0 for h in hist)


def test_em_classwise_one_perturbation_per_class(runs, src):
    """Every image of a class carries the same perturbation wherever its own pixel clip did not bite."""
    clean = read_image_folder(src, progress=False)
    x = clean.images.to(torch.int16)
    free = (x >= 8) & (x <= 247)  # pixels where x + delta cannot leave [0, 255]
    for name, shared in (("em-classwise", True), ("em", False)):
        d = load_delta_npy(runs[name][0] / "perturbation_int8.npy").to(torch.int16)
        for c in range(len(clean.classes)):
            rows = (clean.labels == c).nonzero().flatten().tolist()
            ref = rows[0]
            same = [bool((d[i] == d[ref])[free[i] & free[ref]].all()) for i in rows[1:]]
            assert all(same) if shared else not any(same), (name, c)
    d = load_delta_npy(runs["em-classwise"][0] / "perturbation_int8.npy")
    assert int(d.abs().max()) > 0


def test_em_classwise_writes_its_rows(runs, src):
    """poison_classwise.pt: the [C, 3, H, W] rows in whole grey levels, row c for class c, such that
    every protected image is exactly clip(clean + row of its class), the way class-wise readers (the
    MI-UE and EM evaluation code) rebuild it. Sample-wise EM writes none."""
    clean = read_image_folder(src, progress=False)
    out, m = runs["em-classwise"]
    rows = torch.load(out / "poison_classwise.pt", weights_only=True)
    assert rows.dtype == torch.float32 and rows.shape == (len(clean.classes), 3, 32, 32)
    assert float(rows.abs().max()) <= 8 / 255 + 1e-7 and float(rows.abs().max()) > 0
    assert m["outputs"]["poison_classwise.pt"]["written"] is True
    levels = rows * 255
    assert torch.equal(levels, levels.round())
    d = load_delta_npy(out / "perturbation_int8.npy").to(torch.int16)
    rebuilt = (clean.images.to(torch.int16) + levels.round().to(torch.int16)[clean.labels]).clamp(0, 255)
    assert torch.equal(clean.images.to(torch.int16) + d, rebuilt)
    assert not (runs["em"][0] / "poison_classwise.pt").exists() and "poison_classwise.pt" not in runs["em"][1]["outputs"]


def test_em_defaults_and_validation(src, tmp_path):
    cfg = EMConfig()
    assert (cfg.pgd_steps, round(cfg.alpha * 255, 6), round(cfg.eps * 255, 6)) == (20, 0.8, 8)
    assert (cfg.train_steps, cfg.stop_acc, cfg.batch_size, cfg.poison_batch_size) == (10, 0.99, 512, 512)
    assert (cfg.lr, cfg.weight_decay, cfg.post_aug) == (0.1, 5e-4, False)
    assert cfg.learning_rate(1) == cfg.learning_rate(cfg.epochs) == 0.1  # constant while searching
    assert EMClasswiseConfig().pgd_steps == 1
    for bad in (dict(stop_acc=1.5), dict(stop_acc=-0.1), dict(stop_acc="high")):
        with pytest.raises(ValueError, match=f"stop_acc.*{bad['stop_acc']!r}"):
            EMConfig(**bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"train_steps.*{bad!r}"):
            EMConfig(train_steps=bad)
    assert cfg.grad_clip == 5.0 and EMConfig(grad_clip=None).grad_clip is None
    with pytest.raises(ValueError, match="grad_clip.*0"):
        EMConfig(grad_clip=0)
    with pytest.raises(ValueError, match="stop_acc"):
        ue_fast.protect(src, tmp_path / "o", method="em-classwise", stop_acc=2, **FAST)
    with pytest.raises(ValueError, match="no setting"):
        ue_fast.protect(src, tmp_path / "o", method="em", adv_eps=4 / 255, **FAST)


def test_em_clips_the_surrogate_gradient_norm(src, tmp_path, monkeypatch):
    """Their trainer clips the gradient's total norm at ``grad_clip`` before every SGD step."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        seen.append(max_norm)
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    ue_fast.protect(src, tmp_path / "o", method="em", **dict(FAST, epochs=1), train_steps=2, stop_acc=1.0,
                    grad_clip=5.0)
    assert seen == [5.0, 5.0]  # two surrogate batches, each clipped
    seen.clear()
    ue_fast.protect(src, tmp_path / "n", method="em", **dict(FAST, epochs=1), train_steps=2, stop_acc=1.0,
                    grad_clip=None)
    assert seen == []


# -- effectiveness ---------------------------------------------------------------------------
