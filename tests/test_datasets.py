"""The field's data sets in their own order (``ue_fast.data.canonical``), order files for folders,
outputs in the data set's order, and other tools' poisons in (``ue_fast.data.poisons``)."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import ue_fast
from _helpers import demo_sets, demo_subset, write_cifar10
from ue_fast.cli import main as cli_main
from ue_fast.data.canonical import UnsafePickleError, detect, load_dataset, restricted_load
from ue_fast.data.poisons import apply_perturbation, load_poisoned


@pytest.fixture(scope="module")
def demo():
    return demo_sets()


@pytest.fixture(scope="module")
def cifar(demo, tmp_path_factory):
    """A CIFAR-10 distribution of 300 demo images in a shuffled (non-sorted) index order."""
    train, _ = demo
    perm = np.random.default_rng(5).permutation(len(train))[:300]
    images, labels = train.images.numpy()[perm], train.labels.numpy()[perm]
    root = tmp_path_factory.mktemp("cifar")
    return write_cifar10(root, images, labels, train.classes), images, labels, train.classes


# ----------------------------------------------------------------------------- readers


def test_cifar10_batches_read_in_index_order(cifar):
    d, images, labels, classes = cifar
    assert detect(d) == detect(d.parent) == "cifar10"
    for path in (d, d.parent):  # the folder itself, or the root holding it (torchvision's root)
        s = load_dataset(path)
        assert torch.equal(s.images, torch.from_numpy(images)) and s.labels.tolist() == labels.tolist()
        assert s.classes == list(classes) and s.origin["order"] == "index" and s.origin["split"] == "train"
        assert s.paths[7] == f"{classes[labels[7]]}/000007.png"
    t = load_dataset(d, "test")
    assert torch.equal(t.images, torch.from_numpy(images[:20]))
    with pytest.raises(ValueError, match="split"):
        load_dataset(d, "extra")


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["a", "b"], "x": Evil()}, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="system"):
        load_dataset(d)
    assert not marker.exists()
    # any other class is refused too, and the error names it
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["a", "b"], "c": torch.nn.Identity}, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="torch.nn"):
        restricted_load(d / "batches.meta")
    (d / "batches.meta").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read"):
        restricted_load(d / "batches.meta")
    # bytes keys (a batch re-saved from Python 3 with encoding="bytes") read as str
    with open(d / "m", "wb") as f:
        pickle.dump({b"label_names": [b"a"], b"data": np.zeros((1, 3072), np.uint8)}, f, protocol=2)
    assert sorted(restricted_load(d / "m")) == ["data", "label_names"]


def test_cifar100_svhn_and_arrays(demo, tmp_path):
    train, _ = demo
    pick = np.arange(0, 1000, 16)[:60]  # every class
    images, labels = train.images.numpy()[pick], train.labels.numpy()[pick]
    # CIFAR-100: 'train' / 'test' / 'meta', fine and coarse labels
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    fine = (labels * 7 + np.arange(60)) % 100
    for name, k in (("train", 60), ("test", 10)):
        with open(d / name, "wb") as f:
            pickle.dump({"data": images[:k].reshape(k, -1), "fine_labels": fine[:k].tolist(),
                         "coarse_labels": (fine[:k] // 5).tolist(), "filenames": []}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i:02d}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, f, protocol=2)
    s = load_dataset(tmp_path)
    assert s.origin["format"] == "cifar100" and len(s.classes) == 100
    assert torch.equal(s.images, torch.from_numpy(images)) and s.labels.tolist() == fine.tolist()
    assert len(load_dataset(d, "test")) == 10

    # SVHN: X [32, 32, 3, N], y in 1..10 with 10 for the digit 0
    scipy_io = pytest.importorskip("scipy.io")
    digits = labels % 10
    scipy_io.savemat(tmp_path / "train_32x32.mat",
                     {"X": images.transpose(2, 3, 1, 0), "y": np.where(digits == 0, 10, digits)[:, None]})
    s = load_dataset(tmp_path / "train_32x32.mat")
    assert s.origin["format"] == "svhn" and s.classes == [str(i) for i in range(10)]
    assert torch.equal(s.images, torch.from_numpy(images)) and s.labels.tolist() == digits.tolist()

    # arrays: a .npz (x NHWC, y, classes) and a folder of x.npy / y.npy
    np.savez(tmp_path / "set.npz", x=images.transpose(0, 2, 3, 1), y=labels, classes=np.array(train.classes))
    s = load_dataset(tmp_path / "set.npz")
    assert torch.equal(s.images, torch.from_numpy(images)) and s.classes == train.classes
    (tmp_path / "arr").mkdir()
    np.save(tmp_path / "arr" / "x.npy", images.transpose(0, 2, 3, 1))
    np.save(tmp_path / "arr" / "y.npy", labels)
    assert detect(tmp_path / "arr") == "arrays" and torch.equal(load_dataset(tmp_path / "arr").images,
                                                                 torch.from_numpy(images))
    np.savez(tmp_path / "bad.npz", x=images, y=labels)  # NCHW, not NHWC
    with pytest.raises(ValueError, match="NHWC"):
        load_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=labels)
    with pytest.raises(ValueError, match="Python objects"):
        load_dataset(tmp_path / "obj.npz")


# ----------------------------------------------------------------------------- protect in the set's order


def _png(path):
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def test_protect_cifar_batches_writes_outputs_in_index_order(cifar, tmp_path):
    d, images, labels, classes = cifar
    m = ue_fast.protect(d, tmp_path / "p", method="lsp", progress=False, device="cpu")
    assert m["dataset"]["format"] == "cifar10" and m["dataset"]["order"] == "index"
    assert [f["index"] for f in m["files"]] == list(range(300))
    assert [f["label"] for f in m["files"]] == labels.tolist()
    poison = torch.load(tmp_path / "p" / "poison.pt", weights_only=True)
    npy = torch.from_numpy(np.load(tmp_path / "p" / "perturbation_int8.npy"))
    for i in (0, 1, 150, 299):  # row i of every output is image i of the data set
        png = _png(tmp_path / "p" / m["files"][i]["output"])
        eff = png.to(torch.int16) - torch.from_numpy(images[i]).to(torch.int16)
        assert torch.equal(eff, npy[i].to(torch.int16))
        assert torch.equal(torch.round(poison[i] * 255).to(torch.int16), eff)
    # the poison.pt, read back against the same distribution, gives the PNGs exactly
    back = load_poisoned(tmp_path / "p" / "poison.pt", load_dataset(d))
    pngs = torch.stack([_png(tmp_path / "p" / f["output"]) for f in m["files"]])
    assert torch.equal(back.images, pngs) and back.origin["layout"] == "sample-wise"
    with pytest.raises(ValueError, match="order applies"):
        ue_fast.protect(d, tmp_path / "q", method="lsp", progress=False, device="cpu", order=["x"])
    # evaluate finds the clean counterparts of the PNG tree in the distribution the manifest names
    r = ue_fast.evaluate.evaluate(tmp_path / "p", d, arch="cnn-small", epochs=1, device="cpu", progress=False,
                                  mi=True)
    assert r["num_train"] == 300 and r["num_test"] == 20 and "mi" in r


def test_order_file_sets_the_data_set_order(tmp_path, capsys):
    src = demo_subset(tmp_path / "in", ("airplane", "cat", "ship"), 6)
    rels = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg"))
    order = [rels[i] for i in np.random.default_rng(1).permutation(len(rels))]
    (tmp_path / "order.txt").write_text("\n".join(order) + "\n")
    assert cli_main(["protect", str(src), str(tmp_path / "p"), "--method", "lsp", "--device", "cpu",
                     "--no-progress", "--order", str(tmp_path / "order.txt")]) == 0
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert [f["source"] for f in m["files"]] == order
    assert m["dataset"]["order"] == "order-file"
    assert [f["label"] for f in m["files"]] == [["airplane", "cat", "ship"].index(p.split("/")[0]) for p in order]
    npy = np.load(tmp_path / "p" / "perturbation_int8.npy")
    for i in (0, 9, 17):
        clean = np.asarray(Image.open(src / order[i]).convert("RGB")).transpose(2, 0, 1).astype(np.int16)
        png = _png(tmp_path / "p" / m["files"][i]["output"]).numpy().astype(np.int16)
        assert np.array_equal(png - clean, npy[i])
    # an order that misses, repeats or invents a path is refused before anything is written
    for bad, msg in ((order[:-1], "lists 17 of the 18"), (order[:-1] + order[:1], "more than once"),
                     (order[:-1] + ["cat/nope.jpg"], "not images")):
        (tmp_path / "bad.txt").write_text("\n".join(bad))
        assert cli_main(["protect", str(src), str(tmp_path / "q"), "--method", "lsp", "--device", "cpu",
                         "--no-progress", "--order", str(tmp_path / "bad.txt")]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "q").exists()
    # an unreadable image cannot be skipped: every index must hold its image
    (src / "cat" / order[0].split("/")[1]).write_bytes(b"broken") if order[0].startswith("cat/") else \
        (src / order[0]).write_bytes(b"broken")
    with pytest.raises(ValueError, match="none can be skipped"):
        ue_fast.protect(src, tmp_path / "r", method="lsp", progress=False, device="cpu", skip_bad=True,
                        order=tmp_path / "order.txt")


# ----------------------------------------------------------------------------- other tools' poisons in


def test_poison_tensors_against_the_base_set(demo, tmp_path):
    train, _ = demo
    pick = torch.arange(0, 1000, 25)  # 40 images of every class
    base = ue_fast.data.images_from_arrays(train.images[pick], train.labels[pick], train.classes)
    g = torch.Generator().manual_seed(0)
    k = torch.randint(-8, 9, (40, 3, 32, 32), generator=g)
    expect = (base.images.to(torch.int16) + k).clamp(0, 255).to(torch.uint8)
    # float32 k/255 as the MI-UE / EM code saves it: 255 * float32(k/255) may fall under k
    torch.save((k.float() / 255).cuda() if torch.cuda.is_available() else k.float() / 255, tmp_path / "p.pt")
    s = load_poisoned(tmp_path / "p.pt", base)
    assert torch.equal(s.images, expect) and s.labels.tolist() == base.labels.tolist()
    assert s.origin["layout"] == "sample-wise" and s.origin["linf_255"] <= 8
    # plain truncation would lose a level on some pixels: the tolerance is what keeps them
    trunc = (base.images.double() + (k.float() / 255).double() * 255).clamp(0, 255).floor().to(torch.uint8)
    assert not torch.equal(trunc, expect)
    # class-wise [C, 3, H, W]: row c for every image of class c
    cw = torch.randint(-8, 9, (10, 3, 32, 32), generator=g)
    torch.save(cw.float() / 255, tmp_path / "cw.pt")
    s = load_poisoned(tmp_path / "cw.pt", base)
    assert s.origin["layout"] == "class-wise"
    assert torch.equal(s.images, (base.images.to(torch.int16) + cw[base.labels]).clamp(0, 255).to(torch.uint8))
    # int8 in 1/255 (our perturbation_int8.npy) and uint8 protected images (NHWC too)
    np.save(tmp_path / "d.npy", k.to(torch.int8).numpy())
    assert torch.equal(load_poisoned(tmp_path / "d.npy", base).images, expect)
    torch.save(expect.permute(0, 2, 3, 1).contiguous(), tmp_path / "img.pt")
    assert torch.equal(load_poisoned(tmp_path / "img.pt", base).images, expect)
    # sizes that match neither the images nor the classes: the error names both
    torch.save(k[:7].float() / 255, tmp_path / "s.pt")
    with pytest.raises(ValueError, match="7 perturbations.*40 images and 10 classes"):
        load_poisoned(tmp_path / "s.pt", base)
    torch.save(k.float(), tmp_path / "big.pt")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_poisoned(tmp_path / "big.pt", base)
    torch.save({"noise": torch.nn.Identity()}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_poisoned(tmp_path / "obj.pt", base)
    # the 8-bit rule itself
    c = torch.tensor([[[[0, 100, 250]]]], dtype=torch.uint8).expand(1, 3, 1, 3)
    d = torch.tensor([-3 / 255, 7 / 255, 9 / 255], dtype=torch.float32).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert apply_perturbation(c, d)[0, 0, 0].tolist() == [0, 107, 255]


def test_evaluate_reads_other_tools_poisons(cifar, tmp_path, capsys):
    d, images, labels, classes = cifar
    ue_fast.protect(d, tmp_path / "p", method="lsp", progress=False, device="cpu")
    assert cli_main(["export-apbench", str(tmp_path / "p"), str(tmp_path / "apb"), "--dataset", "c10"]) == 0
    capsys.readouterr()
    data = tmp_path / "apb" / "lsp_poisons" / "c10"
    runs = {}
    for name, train in (("apbench", data), ("tensor", tmp_path / "p" / "poison.pt")):
        r = ue_fast.evaluate.evaluate(train, d, clean=d, arch="cnn-small", epochs=1, device="cpu", progress=False)
        runs[name] = r
        assert r["train_source"]["format"] == name and r["num_train"] == 300
        assert r["train_source"]["linf_255"] == 8
    # both read the same images, so the same victim comes out
    assert runs["apbench"]["test_acc"] == runs["tensor"]["test_acc"]
    assert cli_main(["evaluate", "--train", str(data), "--test", str(d), "--arch", "cnn-small", "--epochs", "1",
                     "--device", "cpu", "--no-progress"]) == 2
    assert "clean base set" in capsys.readouterr().err
    # a base set of another size: the error names both
    small = tmp_path / "small"
    write_cifar10(small, images[:100], labels[:100], classes)
    with pytest.raises(ValueError, match="300 images numbered 0..299, but the base set has 100"):
        ue_fast.evaluate.evaluate(data, d, clean=small, arch="cnn-small", epochs=1, device="cpu", progress=False)
