"""Shared helpers of the tests: op assertions, small real image folders."""
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from conftest import TOL

# CIFAR-10 as an image-folder tarball, beside the repository (shared/data); tests that need
# more than the shipped demo subset read it when present.
SHARED_TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, msg: str = ""):
    """Compare with the tolerance of ``dtype``; ``scale`` widens it (for long sums)."""
    tol = TOL[dtype]
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values (an unwritten output?)"
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(),
        rtol=tol["rtol"] * scale, atol=tol["atol"] * scale, msg=lambda m: f"{msg}: {m}",
    )


def demo_subset(dst: Path, classes=("airplane", "cat", "ship"), per_class: int = 12, split: str = "train") -> Path:
    """Copy the first ``per_class`` images of each class of the shipped demo ``split`` into ``dst``."""
    from ue_fast.data import demo_dir

    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in sorted((demo_dir() / split / c).iterdir())[:per_class]:
            shutil.copy(f, dst / c / f.name)
    return dst


def ops_protected_subset(root: Path, per_class: int) -> tuple[Path, Path, Path]:
    """(train, test, protected): ``per_class`` demo training images of 3 classes, 4 test images
    each, and the training images protected with OPS (training-free: a second)."""
    import ue_fast

    train = demo_subset(root / "train", per_class=per_class)
    test = demo_subset(root / "test", per_class=4, split="test")
    ue_fast.protect(train, root / "prot", method="ops", device="cpu", progress=False)
    return train, test, root / "prot"


def demo_sets():
    """The 1,000 shipped demo training images and the 200 demo test images, as ``ImageSet``s."""
    from ue_fast.data import demo_dir, read_image_folder

    return (read_image_folder(demo_dir() / "train", progress=False),
            read_image_folder(demo_dir() / "test", progress=False))


def victim_accuracy(train, images, test, epochs: int) -> float:
    """Last-epoch test accuracy of a cnn-small victim (seed 0, crop + flip) trained on ``images``
    with ``train``'s labels, tested on the ``test`` set."""
    from ue_fast.evaluate import train_victim

    return train_victim(images, train.labels, test.images, test.labels, len(train.classes), arch="cnn-small",
                        epochs=epochs, seed=0).last


def protected_victim(train, test, out: Path, method: str, victim_epochs: int, source=None, **settings):
    """Protect ``source`` (default: the demo training folder; it must hold ``train``'s images)
    with ``method`` into ``out`` (CPU; ``settings`` go to ``protect``) and train a victim on it
    for ``victim_epochs`` epochs.

    Checks that labels are kept and every pixel is within the budget. Returns the victim's
    accuracy and the manifest.
    """
    import ue_fast
    from ue_fast.data import demo_dir, read_image_folder

    source = demo_dir() / "train" if source is None else source
    m = ue_fast.protect(source, out, method=method, device="cpu", progress=False, **settings)
    prot = read_image_folder(out, progress=False)
    assert prot.labels.tolist() == train.labels.tolist()
    d = prot.images.int() - train.images.int()
    assert 0 < int(d.abs().max()) <= round(m["settings"]["eps_255"])
    return victim_accuracy(train, prot.images, test, victim_epochs), m


def protect_killed_after_checkpoint(monkeypatch, src, out: Path, die_at: int = 1, **settings) -> None:
    """``ue_fast.protect(src, out, **settings)`` interrupted by a KeyboardInterrupt right after
    the runner's ``die_at``-th checkpoint (asserted to happen; ``checkpoint_every`` defaults to 0
    here, a checkpoint after every step); the runner's save is restored."""
    import pytest

    import ue_fast
    import ue_fast.generation.runner as runner

    real = runner.save_checkpoint
    calls = 0

    def save_then_die(path, state):
        nonlocal calls
        real(path, state)
        calls += 1
        if calls == die_at:
            raise KeyboardInterrupt

    settings.setdefault("checkpoint_every", 0)
    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            ue_fast.protect(src, out, **settings)
    finally:
        monkeypatch.setattr(runner, "save_checkpoint", real)


def write_cifar10(root, images, labels, classes, test_n=20):
    """CIFAR-10's python distribution as torchvision downloads it: five pickled training batches
    (dicts of 'data' uint8 [n, 3072] in R, G, B planes, 'labels', 'filenames', 'batch_label'),
    'test_batch' and 'batches.meta'; protocol 2, as the original Python 2 files."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    x = images.reshape(len(images), -1)
    for i, idx in enumerate(np.array_split(np.arange(len(images)), 5), 1):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": labels[idx].tolist(), "data": x[idx],
                         "filenames": [f"img_{j}.png" for j in idx]}, f, protocol=2)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": labels[:test_n].tolist(), "data": x[:test_n],
                     "filenames": []}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(classes), "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=2)
    return d


def demo_files(per_class: int = 3) -> tuple[list[Path], list[int], list[str]]:
    """The first ``per_class`` JPEG files of every class of the shipped demo training set, with
    their labels and the sorted class names (the inputs of the table and LMDB tests)."""
    from ue_fast.data import demo_dir

    classes = sorted(p.name for p in (demo_dir() / "train").iterdir() if p.is_dir())
    files = [f for c in classes for f in sorted((demo_dir() / "train" / c).glob("*.jpg"))[:per_class]]
    return files, [classes.index(f.parent.name) for f in files], classes
