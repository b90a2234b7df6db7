"""Contrastive learners (ue_fast.evaluate.learners): the losses as APBench writes them, the
pretraining and probe reproducible and of the stated shapes, evaluate's --learner end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import ue_fast
from _helpers import ops_protected_subset
from ue_fast.cli import main as cli_main
from ue_fast.evaluate.learners import (BASE_TEMPERATURE, LEARNERS, SETTINGS, linear_probe, moco_loss, nt_xent,
                                       pretrain)


def supcon_all_unlabelled(z1, z2, temperature):
    """APBench's SimCLRLoss (util_us.py L625-697, SupCon's "all" mode, no labels) written out:
    every view an anchor, its one positive the other view of its sample, self-contrast masked,
    mean over anchors of -(T / base_T) log p(positive)."""
    feats = torch.cat([z1, z2])
    n, b = len(feats), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        others = [j for j in range(n) if j != i]
        logits = torch.stack([feats[i] @ feats[j] / temperature for j in others])
        log_prob = feats[i] @ feats[pos] / temperature - torch.logsumexp(logits, 0)
        total = total - (temperature / BASE_TEMPERATURE) * log_prob
    return total / n


def test_nt_xent_is_apbench_simclr_loss(gen):
    z1 = F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=1)
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), supcon_all_unlabelled(z1, z2, 0.5))


def test_moco_loss_is_the_queue_cross_entropy(gen):
    q = F.normalize(torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(8, 7, generator=gen, dtype=torch.float64), dim=0)
    expected = 0.0
    for i in range(5):
        logits = torch.cat([(q[i] @ k[i]).view(1), q[i] @ queue]) / 0.2
        expected = expected - torch.log_softmax(logits, 0)[0]
    torch.testing.assert_close(moco_loss(q, k, queue, 0.2), expected / 5 * (0.2 / BASE_TEMPERATURE))


def test_settings_are_apbenchs():
    assert LEARNERS == ("supervised", "simclr", "moco")
    assert SETTINGS["simclr"] == {"lr": 0.5, "temperature": 0.5}
    assert SETTINGS["moco"] == {"lr": 0.3, "temperature": 0.2, "queue": 4096, "momentum": 0.99}


@pytest.mark.parametrize("kind", ["simclr", "moco"])
def test_pretraining_is_reproducible_and_leaves_the_classifier_alone(kind, gen):
    images = torch.randint(0, 256, (40, 3, 16, 16), generator=gen, dtype=torch.uint8)
    runs = [pretrain(images, kind, arch="cnn-small", num_classes=4, epochs=2, seed=3, batch_size=16)
            for _ in range(2)]
    (a, la), (b, lb) = runs
    assert la == lb and len(la) == 2 and all(math.isfinite(v) for v in la)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    torch.manual_seed(3)  # the classifier keeps its initialisation: only the features are trained
    from ue_fast.models import build_model

    fresh = dict(build_model("cnn-small", 4, image_size=16).named_parameters())
    trained = dict(a.named_parameters())
    assert all(torch.equal(fresh[k], trained[k]) for k in fresh if k.startswith("classifier."))
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh if not k.startswith("classifier."))


def test_linear_probe_reads_the_frozen_features(gen):
    """A backbone whose features are the class: the probe learns it; the backbone is not trained."""
    from ue_fast.models import build_model

    torch.manual_seed(0)
    backbone = build_model("cnn-small", 3, image_size=16)
    before = [p.clone() for p in backbone.parameters()]
    labels = torch.arange(60) % 3
    images = torch.zeros(60, 3, 16, 16, dtype=torch.uint8)
    for c in range(3):  # one bright channel per class
        images[labels == c, c] = 255
    r = linear_probe(backbone, images, labels, images[:30], labels[:30], 3, lr=0.5, epochs=20)
    assert len(r.test_acc) == len(r.train_acc) == len(r.train_loss) == 20 and r.initial_loss > 0
    assert r.last == 1.0
    assert all(torch.equal(p, q) for p, q in zip(before, backbone.parameters()))


def test_learner_through_evaluate(tmp_path, capsys):
    train, test, prot = ops_protected_subset(tmp_path, per_class=8)
    out = tmp_path / "r.json"
    args = ["evaluate", "--train", str(prot), "--test", str(test), "--arch", "cnn-small", "--epochs", "2", "--device",
            "cpu", "--no-progress", "--learner", "moco", "--probe-epochs", "3", "--reference", "--out", str(out)]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    lrn = r["learner"]
    assert lrn["kind"] == "moco" and lrn["probe_on"] == "clean counterparts" and len(lrn["pretrain_loss"]) == 2
    assert r["settings"]["learner"] == "moco" and len(r["test_acc"]) == 3
    assert r["comparison"] is not None and len(r["comparison"]["clean"]["test_acc"]) == 3
    assert "learner moco: pretrained 2 epochs" in text
    with pytest.raises(ValueError, match="without defense 'jpeg'"):
        ue_fast.evaluate(prot, test, arch="cnn-small", epochs=1, learner="simclr", defense="jpeg", device="cpu")
    with pytest.raises(ValueError, match="unknown learner"):
        ue_fast.evaluate(prot, test, arch="cnn-small", epochs=1, learner="byol", device="cpu")


def test_learners_are_a_report_axis(tmp_path):
    """--learner supervised,simclr: the supervised victims under --defenses and a simclr row per
    victim (no other defence, ratio 1 only), its clean cell beside it; the robustness summary
    counts it among what the protection must survive."""
    train, test, prot = ops_protected_subset(tmp_path, per_class=8)
    out = tmp_path / "rep"
    args = ["report", str(prot), "--clean", str(train), "--test", str(test), "--out", str(out), "--archs", "cnn-small",
            "--defenses", "none,bdr", "--learner", "supervised,simclr", "--poison-ratios", "1,0.5", "--epochs", "1",
            "--probe-epochs", "2", "--device", "cpu", "--no-progress"]
    assert cli_main(args) == 0
    cells = sorted(p.stem for p in (out / "cells").iterdir())
    assert cells == sorted(["clean_cnn-small_none", "protected_cnn-small_none_r1", "protected_cnn-small_none_r0.5",
                            "clean_cnn-small_bdr", "protected_cnn-small_bdr_r1", "protected_cnn-small_bdr_r0.5",
                            "clean_cnn-small_simclr", "protected_cnn-small_simclr_r1"])
    doc = json.loads((out / "report.json").read_text())
    assert doc["defenses"] == ["none", "bdr"] and doc["learners"] == ["supervised", "simclr"]
    row = doc["rows"][-1]
    assert row["defense"] == "simclr" and row["learner"] == "simclr" and row["ratios"]["0.5"]["protected"] is None
    cell = doc["cells"]["protected_cnn-small_simclr_r1"]
    assert cell["learner"]["kind"] == "simclr" and cell["settings"]["defense"] == "none"
    assert doc["robustness"]["1"][0]["defenses"] == ["none", "bdr", "simclr"]
    md = (out / "report.md").read_text()
    assert "Rows simclr: a contrastive learner" in md and "| cnn-small | simclr |" in md
    bad = list(args)
    bad[bad.index("supervised,simclr")] = "supervised,byol"
    bad[bad.index(str(out))] = str(tmp_path / "rep2")
    assert cli_main(bad) == 2 and not (tmp_path / "rep2").exists()
