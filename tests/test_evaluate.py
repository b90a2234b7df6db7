"""`ue-fast evaluate` / `ue_fast.evaluate` and `ue-fast plot` on small real subsets, on the CPU."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import ue_fast
from _helpers import demo_subset
from ue_fast.cli import main as cli_main
from ue_fast.evaluate import FORMAT, DEFENSES, load_results

CLASSES = ("airplane", "cat", "ship")


def _subset(dst: Path, split="train", classes=CLASSES, per_class=10) -> Path:
    return demo_subset(dst, classes, per_class, split)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train = _subset(root / "train")
    test = _subset(root / "test", split="test", per_class=5)
    prot = root / "protected"
    ue_fast.protect(train, prot, arch="cnn-small", epochs=1, pgd_steps=1, batch_size=10, poison_batch_size=30,
                    progress=False, device="cpu")
    return train, test, prot


def test_cli_writes_results_and_plot(folders, tmp_path, capsys):
    train, test, prot = folders
    out = tmp_path / "r" / "results.json"
    args = ["evaluate", "--train", str(prot), "--test", str(test), "--arch", "cnn-small", "--epochs", "2",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    assert cli_main(args) == 0
    assert "clean test accuracy on 15 images" in capsys.readouterr().out
    r = load_results(out)
    assert r["format"] == FORMAT and r["num_train"] == 30 and r["num_test"] == 15
    assert len(r["test_acc"]) == 2 and len(r["train_acc"]) == 2
    assert r["best"] == max(r["test_acc"]) and r["last"] == r["test_acc"][-1]
    assert r["peak_accuracy"] == r["best"] and r["test_acc"].index(r["best"]) == r["peak_epoch"] - 1
    assert all(0 <= a <= 1 for a in r["test_acc"] + r["train_acc"])
    assert r["settings"]["defense"] == "none" and r["settings"]["weight_decay"] == 5e-4
    with Image.open(out.with_suffix(".png")) as im:
        assert im.format == "PNG" and im.size[0] > 300

    # several results files overlaid in one plot
    out2 = tmp_path / "r2.json"
    assert cli_main(args[:-1] + [str(out2), "--defense", "grayscale"]) == 0
    assert json.loads(out2.read_text())["settings"]["defense"] == "grayscale"
    png = tmp_path / "both.png"
    assert cli_main(["plot", str(out), str(out2), "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG"


def test_same_seed_same_curve(folders):
    train, test, _ = folders
    a = ue_fast.evaluate(train, test, arch="cnn-small", epochs=2, device="cpu", progress=False)
    b = ue_fast.evaluate(train, test, arch="cnn-small", epochs=2, device="cpu", progress=False)
    assert a["test_acc"] == b["test_acc"] and a["train_acc"] == b["train_acc"]


def test_mi_report_from_manifest(folders, tmp_path):
    """--mi finds the clean images through the manifest and reports the feature statistics
    (20 images per class: the 8-dimensional Gaussian estimate needs more than 2 x 8 per class)."""
    _, test, _ = folders
    train = _subset(tmp_path / "train", per_class=20)
    prot = tmp_path / "protected"
    ue_fast.protect(train, prot, arch="cnn-small", epochs=1, pgd_steps=2, batch_size=20, poison_batch_size=60,
                    progress=False, device="cpu")
    r = ue_fast.evaluate(prot, test, arch="cnn-small", epochs=1, device="cpu", progress=False, mi=True,
                         out=tmp_path / "r.json")
    mi = r["mi"]
    assert mi["settings"]["num_images"] == 60 and mi["per_class"]["counts"] == [20, 20, 20]
    for k in ("mi_gap", "mi_clean_protected", "mi_clean_reference", "intra_class_cosine_protected",
              "covariance_trace_protected"):
        assert isinstance(mi[k], float) and math.isfinite(mi[k]), (k, mi[k])
    assert mi["mi_gap"] == mi["mi_clean_reference"] - mi["mi_clean_protected"]
    assert -1 <= mi["intra_class_cosine_protected"] <= 1
    assert load_results(tmp_path / "r.json")["mi"]["mi_gap"] == mi["mi_gap"]
    # a plain folder (no manifest) needs --clean; with it, the same statistics come out
    r2 = ue_fast.evaluate(prot, test, arch="cnn-small", epochs=1, device="cpu", progress=False, mi=True, clean=train)
    assert r2["mi"]["mi_gap"] == mi["mi_gap"]


def test_bad_inputs(folders, tmp_path, capsys):
    train, test, prot = folders
    other = _subset(tmp_path / "other", split="test", classes=("airplane", "dog"), per_class=3)
    with pytest.raises(ValueError, match="different classes"):
        ue_fast.evaluate(train, other, arch="cnn-small", epochs=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown defense"):
        ue_fast.evaluate(train, test, defense="jpeg-2000", epochs=1, device="cpu", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty folder"):
        ue_fast.evaluate(tmp_path / "empty", test, arch="cnn-small", epochs=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        ue_fast.evaluate(tmp_path / "missing", test, arch="cnn-small", epochs=1, device="cpu", progress=False)
    # mi needs the clean images: a plain folder has no manifest naming them
    with pytest.raises(ValueError, match="clean"):
        ue_fast.evaluate(train, test, arch="cnn-small", epochs=1, device="cpu", progress=False, mi=True)

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "ue_fast.evaluate/0", "test_acc": [0.5]}))
    with pytest.raises(ValueError, match="not a results file of this version"):
        load_results(old)
    assert cli_main(["plot", str(old), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a results file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown defence with the list of choices
        cli_main(["evaluate", "--train", str(train), "--test", str(test), "--defense", "nope"])
    err = capsys.readouterr().err
    assert all(d in err for d in DEFENSES), err


def test_every_defense_runs_through_evaluate(folders):
    train, test, _ = folders
    for d in DEFENSES:
        fast = {"dvae": {"epochs": 1}}.get(d)  # D-VAE's VAEs for 1 epoch, not 60 (3 minutes here)
        r = ue_fast.evaluate(train, test, arch="cnn-small", epochs=1, batch_size=15, defense=d, device="cpu",
                             progress=False, adv_eps=4, defense_options=fast)
        assert r["settings"]["defense"] == d and len(r["test_acc"]) == 1


def test_defense_options_reach_the_defense(folders, monkeypatch):
    train, test, _ = folders
    seen = []
    real = ue_fast.evaluate.run.get_defense

    def spy(name, **options):
        seen.append((name, options))
        return real(name, **options)

    monkeypatch.setattr(ue_fast.evaluate.run, "get_defense", spy)
    r = ue_fast.evaluate(train, test, arch="cnn-small", epochs=1, batch_size=15, defense="adv-train", adv_eps=127.5,
                         adv_norm="l2", device="cpu", progress=False)
    assert seen[-1] == ("adv-train", {"eps": 0.5, "norm": "l2"})
    assert r["settings"]["adv_norm"] == "l2" and r["settings"]["adv_eps_255"] == 127.5
    r = ue_fast.evaluate(train, test, arch="cnn-small", epochs=1, batch_size=15, defense="jpeg", jpeg_quality=50,
                         device="cpu", progress=False)
    assert seen[-1] == ("jpeg", {"quality": 50}) and r["settings"]["jpeg_quality"] == 50
    with pytest.raises(ValueError, match="jpeg_quality applies to defense 'jpeg'"):
        ue_fast.evaluate(train, test, defense="none", jpeg_quality=50, epochs=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="adv_norm applies"):
        ue_fast.evaluate(train, test, defense="jpeg", adv_norm="l2", epochs=1, device="cpu", progress=False)


def test_victim_loop_takes_each_epochs_defense(folders):
    """UEraser's max-loss phase ends with an epoch: the loop asks the defence for every epoch's."""
    from ue_fast.data import read_image_folder
    from ue_fast.evaluate import Defense, train_victim

    calls = []

    class Phased(Defense):
        def at_epoch(self, epoch):
            calls.append(epoch)
            return self

    data = read_image_folder(folders[0], progress=False)
    train_victim(data.images, data.labels, data.images, data.labels, len(data.classes), arch="cnn-small", epochs=3,
                 defense=Phased())
    assert calls == [0, 1, 2]


def test_protected_mask_is_class_balanced_and_seeded():
    from ue_fast.evaluate.run import protected_mask

    labels = torch.arange(3).repeat_interleave(torch.tensor([10, 7, 4]))
    m = protected_mask(labels, 3, 0.5, seed=0)
    assert [int(m[labels == c].sum()) for c in range(3)] == [5, 4, 2]  # round(0.5 n_c) of every class
    assert torch.equal(m, protected_mask(labels, 3, 0.5, seed=0))
    assert not torch.equal(m, protected_mask(labels, 3, 0.5, seed=1))
    assert bool(protected_mask(labels, 3, 1.0).all()) and not bool(protected_mask(labels, 3, 0.04).any())


def test_poison_ratio_mixes_protected_and_clean_and_trains_the_reference(folders, monkeypatch, capsys):
    from ue_fast.data import read_image_folder
    from ue_fast.evaluate.run import protected_mask

    train, test, prot = folders
    calls = []
    real = ue_fast.evaluate.run.train_victim

    def spy(images, labels, *args, **kwargs):
        calls.append((images.clone(), labels.clone()))
        return real(images, labels, *args, **kwargs)

    monkeypatch.setattr(ue_fast.evaluate.run, "train_victim", spy)
    assert cli_main(["evaluate", "--train", str(prot), "--test", str(test), "--arch", "cnn-small", "--epochs", "1",
                     "--device", "cpu", "--no-progress", "--poison-ratio", "0.3", "--out",
                     str(prot.parent / "ratio.json")]) == 0
    out = capsys.readouterr().out
    assert "9 of 30 images protected (0.3)" in out and "the 21 clean images alone" in out
    r = json.loads((prot.parent / "ratio.json").read_text())
    part = r["poison_ratio"]
    assert (part["ratio"], part["protected"], part["clean"]) == (0.3, 9, 21)
    assert len(part["clean_part"]["test_acc"]) == 1 and r["settings"]["poison_ratio"] == 0.3
    # what each victim saw: the clean part alone, then protected where the mask says, clean elsewhere
    p, c = read_image_folder(prot, progress=False), read_image_folder(train, progress=False)
    mask = protected_mask(p.labels, 3, 0.3, seed=0)
    assert torch.equal(calls[0][0], c.images[~mask]) and torch.equal(calls[0][1], c.labels[~mask])
    assert torch.equal(calls[1][0], torch.where(mask[:, None, None, None], p.images, c.images))
    assert not torch.equal(p.images[mask], c.images[mask])
    with pytest.raises(ValueError, match="fraction in"):
        ue_fast.evaluate(prot, test, poison_ratio=30, epochs=1, device="cpu", progress=False)


def test_each_arch_trains_with_its_recipe(folders, monkeypatch):
    """The CNNs train with SGD (0.1, 5e-4), the transformers with AdamW (1e-3, 0.05); --lr and
    --weight-decay override either, and the settings say which ran."""
    from ue_fast.evaluate import victim as victim_mod

    train, test, _ = folders
    made = []
    real = victim_mod.make_optimizer

    def spy(params, arch, **kw):
        opt = real(params, arch, **kw)
        made.append((arch, type(opt).__name__, opt.param_groups[0]["weight_decay"]))
        return opt

    monkeypatch.setattr(victim_mod, "make_optimizer", spy)
    r = ue_fast.evaluate(train, test, arch="vit-small", epochs=1, device="cpu", progress=False)
    s = r["settings"]
    assert (s["optimizer"], s["lr"], s["weight_decay"], s["momentum"]) == ("adamw", 1e-3, 0.05, None)
    r = ue_fast.evaluate(train, test, arch="cnn-small", epochs=1, device="cpu", progress=False, lr=0.02,
                         weight_decay=0)
    s = r["settings"]
    assert (s["optimizer"], s["lr"], s["weight_decay"], s["momentum"]) == ("sgd", 0.02, 0, 0.9)
    assert made == [("vit-small", "AdamW", 0.05), ("cnn-small", "SGD", 0)]
    for bad in (dict(lr=0), dict(lr=-1), dict(weight_decay=-1e-4), dict(lr=float("nan"))):
        with pytest.raises(ValueError, match="lr|weight_decay"):
            ue_fast.evaluate(train, test, arch="cnn-small", epochs=1, device="cpu", progress=False, **bad)
