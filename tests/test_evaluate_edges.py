"""No result on the wrong pairs: `evaluate` and `report` check the clean counterparts pair by pair,
mark a diverged victim, set clean and protected accuracy side by side; `export-apbench` warns only
when APBench's base set differs from the export. Tiny sets, cnn-small, the CPU."""
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

import ue_fast
from _helpers import demo_sets, demo_subset, write_cifar10
from ue_fast.data import images_from_arrays
from ue_fast.data.apbench import APBenchExportWarning, export_apbench
from ue_fast.evaluate import (DivergenceWarning, PairMismatchError, PairsWarning, divergence, gap_se,
                              summary_lines)
from ue_fast.evaluate import report as report_mod
from ue_fast.evaluate.pairs import check_pairs

CLASSES = ("airplane", "cat", "ship")
FAST = dict(arch="cnn-small", epochs=1, device="cpu", progress=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """24 training images, their lsp protection (training-free), 12 test images, and a clean folder
    with the same file names whose images are rotated within each class (labels still right)."""
    root = tmp_path_factory.mktemp("edges")
    train = demo_subset(root / "train", CLASSES, 8)
    test = demo_subset(root / "test", CLASSES, 4, "test")
    prot = root / "protected"
    ue_fast.protect(train, prot, method="lsp", progress=False, device="cpu")
    shuffled = root / "shuffled"
    for c in CLASSES:
        (shuffled / c).mkdir(parents=True)
        files = sorted((train / c).iterdir())
        for a, b in zip(files, files[1:] + files[:1]):
            shutil.copy(b, shuffled / c / a.name)
    return train, test, prot, shuffled


# ----------------------------------------------------------------------------- pairs


def test_shuffled_clean_counterparts_are_refused_and_named(sets, tmp_path):
    train, test, prot, shuffled = sets
    # every way evaluate reads the clean counterparts, and report: refused before any training
    for extra in (dict(clean=shuffled), dict(clean=shuffled, poison_ratio=0.5), dict(clean=shuffled, mi=True),
                  dict(clean=shuffled, reference=True)):
        with pytest.raises(PairMismatchError) as e:
            ue_fast.evaluate(prot, test, **FAST, **extra)
        msg = str(e.value)
        assert "24 of 24 pairs differ by more than eps 8/255" in msg and "airplane/0000.png" in msg, msg
        assert "--clean is not the protected set's clean counterpart" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="differ by more than eps 8/255: airplane/0000.png"):
        report_mod.report(prot, shuffled, test, tmp_path / "rep", archs=["cnn-small"], defenses=["none"], epochs=1,
                          device="cpu", progress=False)
    assert not (tmp_path / "rep").exists()
    # two images swapped: both named
    swapped = tmp_path / "swapped"
    shutil.copytree(train, swapped)
    a, b = swapped / "cat" / "0001.jpg", swapped / "cat" / "0005.jpg"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b), b.write_bytes(data_a)
    with pytest.raises(ValueError, match=r"2 of 24 pairs .*cat/0001.png \d+/255, cat/0005.png \d+/255"):
        ue_fast.evaluate(prot, test, clean=swapped, **FAST)


def test_a_pair_within_eps_but_not_the_recorded_one_is_refused(sets, tmp_path):
    """The per-file records: a clean image replaced by its protected version is within eps (L-inf 0)
    but not what protect recorded for that file."""
    train, test, prot, _ = sets
    clean = tmp_path / "clean"
    shutil.copytree(train, clean)
    (clean / "ship" / "0003.jpg").unlink()
    shutil.copy(prot / "ship" / "0003.png", clean / "ship" / "0003.png")
    with pytest.raises(ValueError, match=r"1 of 24 pairs differ from the L-inf protect recorded for their file: "
                                         r"ship/0003.png 0/255 \(recorded \d/255\)"):
        ue_fast.evaluate(prot, test, clean=clean, **FAST)


def test_input_changed_since_protect_is_refused(tmp_path):
    """No --clean: the input the manifest names is read, and checked like any other clean set."""
    src = demo_subset(tmp_path / "in", CLASSES, 4)
    ue_fast.protect(src, tmp_path / "p", method="lsp", progress=False, device="cpu")
    a, b = src / "ship" / "0000.jpg", src / "ship" / "0002.jpg"
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes()), b.write_bytes(data_a)
    with pytest.raises(ValueError, match="ship/0000.png.*the input .* that the manifest names"):
        ue_fast.evaluate(tmp_path / "p", tmp_path / "p", reference=True, **FAST)


def test_without_a_budget_and_for_a_non_lp_method(sets, tmp_path):
    """A protected folder without its manifest: the budget-free test, and the record says no bound was
    checked. cuda (a convolution, no L-inf budget): the per-file records only, and the record says so."""
    train, test, prot, shuffled = sets
    bare = tmp_path / "bare"
    shutil.copytree(prot, bare, ignore=shutil.ignore_patterns("manifest.json", "*.npy", "*.pt"))
    r = ue_fast.evaluate(bare, test, clean=train, **FAST)
    pc = r["pairs_checked"]
    assert pc["rule"] == "nearest" and pc["unmatched"] == 0 and pc["bound_255"] is None
    assert "no L-inf bound checked" in pc["not_checked"] and "Not checked" in summary_lines(r)[-1]
    with pytest.raises(PairMismatchError, match="protected images are no closer to their clean counterpart"):
        ue_fast.evaluate(bare, test, clean=shuffled, **FAST)
    swapped = tmp_path / "swapped"
    shutil.copytree(train, swapped)
    a, b = swapped / "cat" / "0001.jpg", swapped / "cat" / "0005.jpg"
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes()), b.write_bytes(data_a)
    with pytest.warns(PairsWarning, match="cat/0001.png"):  # too few to refuse: named
        ue_fast.evaluate(bare, test, clean=swapped, **FAST)

    ue_fast.protect(train, tmp_path / "cuda", method="cuda", progress=False, device="cpu")
    r = ue_fast.evaluate(tmp_path / "cuda", test, clean=train, **FAST)
    pc = r["pairs_checked"]
    assert pc["budget"]["kind"] == "convolution" and pc["bound_255"] is None
    assert pc["checked"] == ["every pair's L-inf equals the linf_255 the manifest recorded for its file (24 files)"]
    assert "bounds no pixel difference" in pc["not_checked"]
    with pytest.raises(PairMismatchError, match="pairs differ from the L-inf protect recorded"):
        ue_fast.evaluate(tmp_path / "cuda", test, clean=shuffled, **FAST)


def test_true_counterparts_are_accepted_and_the_check_recorded(sets, tmp_path):
    """With reference=True the clean victim trains too: clean and protected side by side, the gap, its SE."""
    train, test, prot, _ = sets
    r = ue_fast.evaluate(prot, test, clean=train, reference=True, out=tmp_path / "r.json", plot=False, **FAST)
    pc = r["pairs_checked"]
    assert pc["count"] == 24 and 0 < pc["max_linf_255"] <= 8 and pc["bound_255"] == 8
    assert pc["budget"]["kind"] == "linf" and pc["budget"]["eps_255"] == 8
    assert pc["source"].endswith("manifest.json") and pc["rule"] == "manifest" and pc["not_checked"] is None
    assert any("recorded" in c for c in pc["checked"]) and any("<= 8/255" in c for c in pc["checked"])
    c = r["comparison"]
    assert c["reference"] == "clean counterparts" and c["n_test"] == 12
    assert c["protected"]["last"] == r["last"] and len(c["clean"]["test_acc"]) == 1
    p1, p2 = c["clean"]["last"], c["protected"]["last"]
    assert c["gap"] == pytest.approx(p1 - p2)
    assert c["gap_se"] == pytest.approx(math.sqrt(p1 * (1 - p1) / 12 + p2 * (1 - p2) / 12))
    assert r["diverged"] is None and len(r["train_loss"]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["pairs_checked"] == pc
    lines = summary_lines(r)
    text = "\n".join(lines)
    assert "clean test accuracy on 12 images" in text
    assert f"gap {100 * (p1 - p2):.2f} ± {100 * c['gap_se']:.2f} points" in text
    assert "pairs checked: 24 protected/clean pairs" in text and "DIVERGED" not in text
    q1, q2 = c["clean"]["peak_accuracy"], c["protected"]["peak_accuracy"]
    assert c["peak_gap"] == pytest.approx(q1 - q2) and c["peak_gap_se"] == pytest.approx(gap_se(q1, q2, 12))
    assert c["protected"]["peak_epoch"] == r["peak_epoch"] and "at each victim's peak epoch" in text
    # without reference (and nothing that trains a clean victim anyway) no second run, but the pairs are checked
    r = ue_fast.evaluate(prot, test, clean=train, **FAST)
    assert r["comparison"] is None and r["pairs_checked"]["count"] == 24
    assert any("no clean reference" in line for line in summary_lines(r))
    # a clean victim trained anyway is the reference: poison_ratio's clean part
    r = ue_fast.evaluate(prot, test, clean=train, poison_ratio=0.5, **FAST)
    assert r["comparison"]["reference"] == "clean part alone"
    assert r["comparison"]["clean"]["last"] == r["poison_ratio"]["clean_part"]["last"]
    assert gap_se(0.5, 0.5, 100) == pytest.approx(math.sqrt(0.005))


def test_another_tools_poisons_against_a_wrong_base_set(tmp_path):
    """protect's poison.pt against a base set shuffled within each class (labels still right): clipped
    pixels prove it; protected images (a uint8 tensor, no budget) fail the budget-free test; a
    third-party perturbation that cannot be told apart is recorded as not checked."""
    train, test = demo_sets()
    pick = torch.arange(0, 1000, 25)  # 4 per class
    base = images_from_arrays(train.images[pick], train.labels[pick], train.classes)
    tp = torch.arange(0, 200, 10)
    te = images_from_arrays(test.images[tp], test.labels[tp], test.classes)
    ue_fast.protect((base.images, base.labels, base.classes), tmp_path / "p", method="lsp", progress=False,
                    device="cpu")
    perm = torch.arange(len(base))
    for c in range(10):
        idx = torch.nonzero(base.labels == c)[:, 0]
        perm[idx] = idx.roll(1)
    wrong = images_from_arrays(base.images[perm], base.labels, base.classes)
    r = ue_fast.evaluate(tmp_path / "p" / "poison.pt", te, clean=base, **FAST)
    assert r["pairs_checked"]["rule"] == "manifest" and r["pairs_checked"]["clipped_pixels"] == 0
    with pytest.raises(ValueError, match=r"base \+ perturbation leaves \[0, 255\] at \d+ pixels.*airplane/"):
        ue_fast.evaluate(tmp_path / "p" / "poison.pt", te, clean=wrong, **FAST)
    with pytest.raises(ValueError, match="not the protected set's clean counterpart"):
        report_mod.load_sets(tmp_path / "p" / "poison.pt", wrong, te)

    g = torch.Generator().manual_seed(0)
    k = torch.randint(-8, 9, tuple(base.images.shape), generator=g)
    protected = (base.images.to(torch.int16) + k).clamp(0, 255).to(torch.uint8)
    torch.save(protected, tmp_path / "images.pt")
    r = ue_fast.evaluate(tmp_path / "images.pt", te, clean=base, **FAST)
    assert r["pairs_checked"]["rule"] == "nearest" and r["pairs_checked"]["unmatched"] == 0
    assert "no L-inf bound checked" in r["pairs_checked"]["not_checked"]
    with pytest.raises(PairMismatchError, match="no closer to their clean counterpart"):
        ue_fast.evaluate(tmp_path / "images.pt", te, clean=wrong, **FAST)

    torch.save(k.float() / 255, tmp_path / "unclamped.pt")  # not clamped to the pixel range: nothing to go by
    r = ue_fast.evaluate(tmp_path / "unclamped.pt", te, clean=wrong, **FAST)
    assert r["pairs_checked"]["checked"] == [] and "not checked" in r["pairs_checked"]["not_checked"]
    assert "Not checked" in summary_lines(r)[-1]
    torch.save((protected.to(torch.int16) - base.images.to(torch.int16)).float() / 255, tmp_path / "clamped.pt")
    r = ue_fast.evaluate(tmp_path / "clamped.pt", te, clean=base, **FAST)
    assert "clips no pixel" in r["pairs_checked"]["checked"][0] and r["pairs_checked"]["not_checked"] is None


def test_check_pairs_streams_memory_mapped_sets(tmp_path, monkeypatch):
    """By chunks (a chunk of 2 images here), on memory-mapped uint8 sets, the record is the same."""
    from ue_fast.evaluate import pairs

    train, _ = demo_sets()
    pick = torch.arange(0, 1000, 100)
    x, y = train.images[pick], train.labels[pick]
    np.save(tmp_path / "c.npy", x.numpy())
    np.save(tmp_path / "p.npy", (x.to(torch.int16) + 3).clamp(0, 255).to(torch.uint8).numpy())

    def mm(name):
        return images_from_arrays(torch.from_numpy(np.load(tmp_path / name, mmap_mode="r")), y, train.classes)

    whole = check_pairs(mm("p.npy"), mm("c.npy"))
    monkeypatch.setattr(pairs, "CHUNK_ELEMS", 2 * 3 * 32 * 32)
    assert check_pairs(mm("p.npy"), mm("c.npy")) == whole and whole["max_linf_255"] == 3
    with pytest.raises(PairMismatchError, match="10 of 10 protected images are no closer"):
        check_pairs(mm("p.npy"), images_from_arrays(x.roll(1, 0), y.roll(1), train.classes))


# ----------------------------------------------------------------------------- divergence


def test_divergence_rule():
    assert divergence([2.3, 1.2, 0.4], 2.3, 10) is None
    assert divergence([float("nan"), float("nan")], 2.3, 10)["epoch"] == 1
    v = divergence([2.2, 9.0, 30.0, 95.0], 2.3, 10)
    assert v["epoch"] == 3 and v["threshold"] == pytest.approx(10 * 2.3026, rel=1e-3)
    assert divergence([2.2, 500.0, 1.0], 2.3, 10) is None  # a spike it recovered from
    # the first steps' spike that a one-epoch run ends on (UEraser's max loss here) is not divergence
    assert divergence([3.43], 1.68, 3) is None
    # a loss that exploded in the first epoch already: measured against the first batch's, not the first epoch's
    assert divergence([1e8, 1e7], 2.3, 10)["epoch"] == 1


def test_lr_1e6_diverges_and_is_marked(sets, tmp_path):
    train, test, prot, _ = sets
    with pytest.warns(DivergenceWarning, match="diverged at epoch"):
        r = ue_fast.evaluate(prot, test, clean=train, reference=True, lr=1e6, **dict(FAST, epochs=2))
    d = r["diverged"]
    assert d is not None and d["epoch"] in (1, 2) and d["reason"]
    assert r["comparison"]["gap"] is None and "protected" in r["comparison"]["diverged"]
    json.dumps(r, allow_nan=False)  # the document stays valid JSON (a NaN loss is written as null)
    text = "\n".join(summary_lines(r))
    assert "[DIVERGED]" in text and "DIVERGED at epoch" in text and "no gap" in text
    # in a report the cells say so instead of a number
    with pytest.warns(DivergenceWarning):
        doc = report_mod.report(prot, train, test, tmp_path / "rep", archs=["cnn-small"], defenses=["none"], epochs=2,
                                lr=1e6, device="cpu", progress=False)
    cell = doc["rows"][0]["ratios"]["1"]
    assert cell["diverged"] and cell["gap"] is None and doc["rows"][0]["clean_diverged"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| cnn-small | none | diverged | diverged | diverged |" in md
    assert "pairs checked: 24 protected/clean pairs" in md


# ----------------------------------------------------------------------------- export-apbench


def test_export_apbench_warns_only_when_the_base_sets_differ(tmp_path):
    train, _ = demo_sets()
    pick = torch.arange(0, 1000, 25)
    write_cifar10(tmp_path / "c10", train.images.numpy()[pick], train.labels.numpy()[pick], train.classes)
    ue_fast.protect(tmp_path / "c10" / "cifar-10-batches-py", tmp_path / "p", method="lsp", progress=False,
                    device="cpu")
    # a whole 40-image CIFAR-10 distribution in its index order: APBench run on that distribution reads it
    with warnings.catch_warnings():
        warnings.simplefilter("error", APBenchExportWarning)
        export_apbench(tmp_path / "p", tmp_path / "apb", dataset="c10")
    # the same distribution in another order: index i is another image there
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    with pytest.warns(APBenchExportWarning, match="not the cifar10 distribution's index order"):
        export_apbench(tmp_path / "p", tmp_path / "apb2", dataset="c10",
                       order=[f["source"] for f in reversed(m["files"])])
    # an image folder of 24 images: APBench's base set is the standard one, 50000 images
    src = demo_subset(tmp_path / "folder", CLASSES, 8)
    ue_fast.protect(src, tmp_path / "q", method="lsp", progress=False, device="cpu")
    with pytest.warns(APBenchExportWarning) as caught:
        export_apbench(tmp_path / "q", tmp_path / "apb3", dataset="c10", allow_folder_order=True)
    msg = " ".join(str(w.message) for w in caught)
    assert "the export holds 24 images but APBench's c10 training set has 50000" in msg
    assert "an image folder" in msg and "IndexError) at item 24" in msg
