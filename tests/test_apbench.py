"""Our poisons as the field's code reads them: the APBench export (``ue_fast.data.apbench``) and
``poison.pt`` / ``poison_classwise.pt`` in the MI-UE authors' evaluation.

The clients' readers are rewritten here from reading their code (not copied), reduced to what
decides which image and which label each index gets:
- APBench (lafeat/apbench, util.py): ``get_dataset`` checks the poison type and data-set key;
  ``Dataset_load`` lists ``dataset/<type>_poisons/<key>/data``, takes the index from each file
  name, the label from the clean torchvision set at that index, and has one item per clean image;
  ImageNet-100 poisons are read by torchvision's ``ImageFolder`` (class folders sorted as strings).
- MI-UE (hala64/mi-ue, datasets/cifar.py, ``CIFAR10Index``): torchvision's CIFAR-10 train order;
  ``poison.pt`` with 10 rows is class-wise (row of each image's label), else one row per image;
  ``clip(uint8 + 255 * delta, 0, 255).astype(uint8)`` in float32.
- torchvision's CIFAR-10: the five training batches unpickled in order, ``data`` reshaped to
  [N, 3, 32, 32] and transposed to HWC, labels from ``labels``.
"""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ue_fast
from _helpers import demo_sets, demo_subset, write_cifar10
from ue_fast.cli import main as cli_main
from ue_fast.data.apbench import APBENCH_TYPES, APBenchExportWarning, export_apbench


def torchvision_cifar10(root):
    """torchvision.datasets.CIFAR10(root, train=True): data [N, 32, 32, 3] uint8 and targets."""
    data, targets = [], []
    for i in range(1, 6):
        with open(os.path.join(root, "cifar-10-batches-py", f"data_batch_{i}"), "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # a file this test wrote itself
        data.append(entry["data"])
        targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)), targets


def apbench_train_set(dataset_root, poison_type, key, base):
    """APBench's get_dataset + Dataset_load for c10: [(file index, HWC image, label)] per item."""
    if poison_type not in ["dc", "em", "rem", "ntga", "hypo", "lsp", "ar", "tap", "ops"]:
        raise ValueError("Valid type poisons")
    root = os.path.join(dataset_root, f"{poison_type}_poisons", key, "data")
    samples = os.listdir(root)
    data, targets = base
    items = []
    for idx in range(len(targets)):  # __len__ is the clean set's length
        true_index = int(samples[idx].split(".")[0])
        label = targets[true_index]
        items.append((true_index, np.asarray(Image.open(os.path.join(root, samples[idx]))), label))
    return items


def miue_cifar10_index(root, poison_path):
    """The MI-UE authors' CIFAR10Index: the poisoned training images and their targets."""
    data, targets = torchvision_cifar10(root)
    delta = torch.load(poison_path, map_location="cpu")
    if len(delta) == 10:
        delta = delta[torch.tensor(targets)]
    if delta.shape != data.shape:
        delta = delta.permute(0, 2, 3, 1)
    assert delta.shape == data.shape
    delta = delta.mul(255).cpu().numpy()
    return np.clip(data.astype(np.float32) + delta, 0, 255).astype(np.uint8), targets


def image_folder(root):
    """torchvision's ImageFolder: (class_to_idx, [(path, label)]) with class folders sorted as strings."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples = [(os.path.join(root, c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(root, c)))]
    return {c: i for i, c in enumerate(classes)}, samples


def png(path):
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A 300-image CIFAR-10 distribution in a shuffled index order, and its lsp protection."""
    train, _ = demo_sets()
    perm = np.random.default_rng(3).permutation(len(train))[:300]
    root = tmp_path_factory.mktemp("c10")
    write_cifar10(root, train.images.numpy()[perm], train.labels.numpy()[perm], train.classes)
    ue_fast.protect(root / "cifar-10-batches-py", root / "p", method="lsp", progress=False, device="cpu")
    return root


def test_apbench_reads_our_export_with_the_right_labels(cifar, tmp_path):
    m = json.loads((cifar / "p" / "manifest.json").read_text())
    # the whole 300-image distribution in its index order: APBench run on it reads every index (below)
    with warnings.catch_warnings():
        warnings.simplefilter("error", APBenchExportWarning)
        out = export_apbench(cifar / "p", tmp_path / "dataset", dataset="c10")
    assert out == tmp_path / "dataset" / "lsp_poisons" / "c10" / "data"
    base = torchvision_cifar10(cifar)
    items = apbench_train_set(tmp_path / "dataset", "lsp", "c10", base)
    assert sorted(i for i, _, _ in items) == list(range(300))
    for i, img, label in items:
        # the label APBench assigns is the label the image was protected with, on every index
        assert label == m["files"][i]["label"] == base[1][i]
        assert np.array_equal(img, png(cifar / "p" / m["files"][i]["output"]))
        # protected = clean base image + a poison within eps, at 8 bits
        assert np.abs(img.astype(np.int16) - base[0][i].astype(np.int16)).max() <= 8
    index = json.loads((out.parent / "index.json").read_text())
    assert [e["label"] for e in index] == base[1]


def test_protect_writes_apbench_layout_itself_as_the_export_would(cifar, tmp_path):
    """--output-format apbench: APBench reads every index with its label, and each file holds the
    bytes export-apbench copies from the PNG tree of the same run."""
    out = tmp_path / "dataset"
    with warnings.catch_warnings():
        warnings.simplefilter("error", APBenchExportWarning)
        m = ue_fast.protect(cifar / "cifar-10-batches-py", out, method="lsp", output_format="apbench",
                            progress=False, device="cpu")
    assert m["outputs"]["apbench"]["written"] and "images" not in m["outputs"]
    assert sorted(p.name for p in out.iterdir()) == ["lsp_poisons", "manifest.json", "perturbation_int8.npy",
                                                     "poison.pt"]  # no PNG tree's class folders beside it
    assert [f["output"] for f in m["files"]] == [f"lsp_poisons/c10/data/{i}.png" for i in range(300)]
    base = torchvision_cifar10(cifar)
    items = apbench_train_set(out, "lsp", "c10", base)
    assert sorted(i for i, _, _ in items) == list(range(300))
    exported = export_apbench(cifar / "p", tmp_path / "exported", dataset="c10")
    for i, img, label in items:
        assert label == m["files"][i]["label"] == base[1][i]
        assert (out / "lsp_poisons" / "c10" / "data" / f"{i}.png").read_bytes() == (exported / f"{i}.png").read_bytes()
    assert json.loads((out / "lsp_poisons" / "c10" / "index.json").read_text()) == \
        json.loads((exported.parent / "index.json").read_text())
    # a method APBench does not know is written, with a warning naming the folder to rename
    with pytest.warns(APBenchExportWarning, match="rename the folder cuda_poisons"):
        ue_fast.protect(cifar / "cifar-10-batches-py", tmp_path / "cuda", method="cuda", output_format="apbench",
                        progress=False, device="cpu")
    assert len(list((tmp_path / "cuda" / "cuda_poisons" / "c10" / "data").iterdir())) == 300


def test_apbench_output_needs_a_training_set_in_its_own_order(cifar, tmp_path):
    folder = tmp_path / "folder"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / c / "0.png")
    for source, split, text in ((folder, "train", "export-apbench"),
                                (cifar / "cifar-10-batches-py", "test", "not the test split")):
        with pytest.raises(ValueError, match=text):
            ue_fast.protect(source, tmp_path / "out", method="lsp", output_format="apbench", split=split,
                            progress=False, device="cpu")
        assert not (tmp_path / "out").exists()
    assert cli_main(["protect", str(folder), str(tmp_path / "out"), "--method", "lsp", "--output-format", "apbench",
                     "--device", "cpu", "--no-progress"]) == 2


def test_miue_evaluation_reads_our_poison_pt(cifar):
    m = json.loads((cifar / "p" / "manifest.json").read_text())
    data, targets = miue_cifar10_index(cifar, cifar / "p" / "poison.pt")
    assert targets == [f["label"] for f in m["files"]]
    for i in range(300):  # bit for bit the PNGs protect wrote, image i on index i
        assert np.array_equal(data[i], png(cifar / "p" / m["files"][i]["output"])), i


def test_miue_evaluation_reads_our_classwise_poison(tmp_path):
    train, _ = demo_sets()
    perm = np.random.default_rng(4).permutation(len(train))[:200]
    write_cifar10(tmp_path, train.images.numpy()[perm], train.labels.numpy()[perm], train.classes)
    m = ue_fast.protect(tmp_path / "cifar-10-batches-py", tmp_path / "p", method="em-classwise", preset="cpu-small",
                        epochs=1, progress=False, device="cpu")
    rows = torch.load(tmp_path / "p" / "poison_classwise.pt", weights_only=True)
    assert rows.shape == (10, 3, 32, 32)
    data, targets = miue_cifar10_index(tmp_path, tmp_path / "p" / "poison_classwise.pt")
    for i in range(200):
        assert np.array_equal(data[i], png(tmp_path / "p" / m["files"][i]["output"])), i
    # and ue-fast evaluate reads the same file the same way
    back = ue_fast.data.poisons.load_poisoned(tmp_path / "p" / "poison_classwise.pt",
                                              ue_fast.data.canonical.load_dataset(tmp_path))
    assert back.origin["layout"] == "class-wise"
    assert np.array_equal(back.images.permute(0, 2, 3, 1).numpy(), data)


def test_export_needs_a_known_order(tmp_path, capsys):
    src = demo_subset(tmp_path / "in", ("airplane", "cat", "ship", "truck"), 15)
    m = ue_fast.protect(src, tmp_path / "p", method="lsp", progress=False, device="cpu")
    # a folder in its sorted order says nothing of APBench's indices: refused, with the ways out
    assert cli_main(["export-apbench", str(tmp_path / "p"), str(tmp_path / "apb")]) == 2
    err = capsys.readouterr().err
    assert "sorted order" in err and "--order" in err and "--allow-folder-order" in err
    assert not (tmp_path / "apb").exists()
    assert cli_main(["export-apbench", str(tmp_path / "p"), str(tmp_path / "apb"), "--allow-folder-order"]) == 0
    out = tmp_path / "apb" / "lsp_poisons" / "c10" / "data"
    assert "warning: the export holds 60 images" in capsys.readouterr().err
    assert sorted(int(p.stem) for p in out.glob("*.png")) == list(range(60))
    assert np.array_equal(png(out / "0.png"), png(tmp_path / "p" / m["files"][0]["output"]))
    # a given order is followed
    order = [f["source"] for f in reversed(m["files"])]
    (tmp_path / "order.txt").write_text("\n".join(order) + "\n")
    assert cli_main(["export-apbench", str(tmp_path / "p"), str(tmp_path / "apb"), "--order",
                     str(tmp_path / "order.txt"), "--overwrite"]) == 0
    assert np.array_equal(png(out / "0.png"), png(tmp_path / "p" / m["files"][-1]["output"]))
    assert cli_main(["export-apbench", str(tmp_path / "p"), str(tmp_path / "apb"), "--allow-folder-order"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly once"):
        export_apbench(tmp_path / "p", tmp_path / "apb2", order=order[:-1])
    with pytest.raises(ValueError, match="manifest"):
        export_apbench(src, tmp_path / "apb3")
    # the type: the method's name by default, warned about when APBench's train.py refuses it
    with pytest.warns(APBenchExportWarning) as caught:
        export_apbench(tmp_path / "p", tmp_path / "apb4", poison_type="miue", allow_folder_order=True)
    assert any("Valid type poisons" in str(w.message) for w in caught)
    assert (tmp_path / "apb4" / "miue_poisons" / "c10" / "data" / "0.png").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", APBenchExportWarning)
        with pytest.raises(APBenchExportWarning, match="60 images"):  # only the size warning is left
            export_apbench(tmp_path / "p", tmp_path / "apb5", poison_type="em", allow_folder_order=True)
    assert "em" in APBENCH_TYPES and "miue" not in APBENCH_TYPES
    # data-set keys are APBench's own
    with pytest.raises(SystemExit):
        cli_main(["export-apbench", str(tmp_path / "p"), str(tmp_path / "apb"), "--dataset", "cifar10"])
    assert "invalid choice: 'cifar10'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="c10, c100, svhn, imagenet100"):
        export_apbench(tmp_path / "p", tmp_path / "apb6", dataset="cifar10", allow_folder_order=True)


def test_export_checks_the_key_against_the_data_set(cifar, tmp_path):
    with pytest.raises(ValueError, match="its APBench key is 'c10', not 'c100'"):
        export_apbench(cifar / "p", tmp_path / "d", dataset="c100")


def test_imagenet100_export_is_an_image_folder(tmp_path):
    src = demo_subset(tmp_path / "in", ("airplane", "cat", "ship"), 5)
    m = ue_fast.protect(src, tmp_path / "p", method="lsp", progress=False, device="cpu")
    with pytest.warns(APBenchExportWarning, match="20000"):
        out = export_apbench(tmp_path / "p", tmp_path / "dataset", dataset="imagenet100", allow_folder_order=True)
    assert out == tmp_path / "dataset" / "lsp_poisons" / "imagenet100"
    class_to_idx, samples = image_folder(out)
    assert class_to_idx == {"airplane": 0, "cat": 1, "ship": 2}  # the clean set's labels, as its ImageFolder gives them
    assert len(samples) == 15
    for path, label in samples:
        i = int(os.path.basename(path).split(".")[0])
        assert label == m["files"][i]["label"]
        assert np.array_equal(png(path), png(tmp_path / "p" / m["files"][i]["output"]))
    # class names whose string order is not the label order become zero-padded label numbers
    train, _ = demo_sets()
    pick = torch.arange(0, 1000, 50)
    m2 = ue_fast.protect((train.images[pick], train.labels[pick], [f"k{9 - i}" for i in range(10)]), tmp_path / "q",
                         method="lsp", progress=False, device="cpu")
    with pytest.warns(APBenchExportWarning):
        out2 = export_apbench(tmp_path / "q", tmp_path / "d2", dataset="imagenet100")
    class_to_idx, samples = image_folder(out2)
    assert sorted(class_to_idx) == [str(i) for i in range(10)]
    for path, label in samples:
        assert label == m2["files"][int(os.path.basename(path).split(".")[0])]["label"]
    # overwrite replaces an earlier export, and nothing else
    with pytest.warns(APBenchExportWarning):
        export_apbench(tmp_path / "q", tmp_path / "d2", dataset="imagenet100", overwrite=True)
    (out2 / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"), pytest.warns(APBenchExportWarning):
        export_apbench(tmp_path / "q", tmp_path / "d2", dataset="imagenet100", overwrite=True)
