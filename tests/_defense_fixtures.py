"""Fixtures shared by the defence tests (test_defenses.py, test_defenses_contract.py,
test_defenses_op_coin.py): two demo images per class, one batch, a small model."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from ue_fast.data import demo_dir, read_image_folder
from ue_fast.evaluate.defenses import get_defense
from ue_fast.models import build_model

UERASERS = ("ueraser-lite", "ueraser", "ueraser-max")


def small(name):
    """The defence ``name`` with UEraser's repeats cut to 2 and D-VAE's epochs to 2 (tests' time)."""
    if name == "dvae":  # its two VAEs for 2 epochs, not 60
        return get_defense(name, epochs=2)
    return get_defense(name, repeats=2) if name in UERASERS else get_defense(name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two CIFAR-10 images per class of the shipped demo subset: uint8 [20, 3, 32, 32], labels [20]."""
    root = tmp_path_factory.mktemp("demo2")
    for src in sorted(p for p in (demo_dir() / "train").iterdir() if p.is_dir()):
        (root / src.name).mkdir()
        for f in sorted(src.glob("*.jpg"))[:2]:
            shutil.copy(f, root / src.name / f.name)
    data = read_image_folder(root, progress=False)
    return data.images, data.labels


@pytest.fixture
def batch(demo):
    """One image per class as the victim loop sees it: x float [10, 3, 32, 32] in [0, 1], y [10]."""
    images, labels = demo
    return images[::2].float() / 255, labels[::2]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("cnn-small", 10)


def clone(gen: torch.Generator) -> torch.Generator:
    twin = torch.Generator()
    twin.set_state(gen.get_state())
    return twin


def ce(model, x, y):
    return F.cross_entropy(model(x)[1], y)
