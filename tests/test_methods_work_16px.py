"""The surrogate methods and CUDA lower a victim's test accuracy, at 16 x 16 to fit the suite.

The 1,000 shipped demo training images and the 200 demo test images, downsampled to 16 x 16
(area averaging): every protection and victim costs a quarter of the 32 x 32 one. One victim
recipe (``ue_fast.evaluate.train_victim``): cnn-small, 30 epochs, crop + flip; the figure is
the mean test accuracy of victim seeds 0 and 1 (one victim on 200 test images is noisy: a
binomial sd of ~0.035). Each method runs its ``cpu-small`` preset (``ue_fast.methods``); REM
with a one-step adversary (its preset's 3 steps cost 3x the time).

Measured 2026-11-29 on a 2-core CPU, victim seeds 0 / 1 (/ 2) (clean: 0.395 / 0.415 / 0.380):

| method | protected | mean gap, seeds 0-1 | threshold |
|---|---|---|---|
| cuda | 0.260 / 0.250 / 0.270 | 0.150 | 0.08 |
| hypo | 0.340 / 0.310 / 0.345 | 0.080 | 0.04 |
| sep  | 0.355 / 0.340 / 0.365; mean of 0-1 0.357 since its loop runs module copies (float rounding) | 0.048 | 0.025 |
| aue  | 0.290 / 0.285 / 0.275 | 0.118 | 0.06 |
| aap  | 0.320 / 0.275 / 0.280 | 0.108 | 0.05 |
| ap   | 0.305 / 0.280 | 0.113 | 0.055 |
| tap  | 0.280 / 0.275 | 0.128 | 0.06 |
| rem  | 0.265 / 0.285 | 0.130 | 0.065 |
| em   | 0.240 / 0.240 | 0.165 | 0.08 |
| em-classwise | 0.255 / 0.225 | 0.165 | 0.08 |

At 32 x 32 (``benchmarks/results/reproduce-small-cpu-2026-11-29-new-methods.md``, 1,000
CIFAR-10 images, 30 victim epochs, clean 0.501): cuda 0.289, hypo 0.407, sep 0.365, aue 0.346,
aap 0.279. AP, TAP, REM, EM and EM-classwise were tested at 32 x 32 until 2026-11-29 (the
figures are in docs/methods.md's table); moved here, the suite takes about 4 minutes less. PIL has no
test: its effect does not show at this scale (16 px: 0.410 / 0.405 / 0.390; 32 px, its paper
settings: 0.435 / 0.445 / 0.455 against 0.485 / 0.470 / 0.485, and 0.486 against 0.501 in the
file above): a linear surrogate fitted to 1,000 images plants a weak linear shortcut, which the
crop + flip victim partly learns around.
"""
import pytest
import torch
import torch.nn.functional as F

import ue_fast
from _helpers import demo_sets
from ue_fast.data import read_image_folder
from ue_fast.evaluate import train_victim

EPOCHS, SIZE, SEEDS = 30, 16, (0, 1)


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.float(), size=(SIZE, SIZE), mode="area").round().clamp(0, 255).to(torch.uint8)


def _accuracy(images, labels, test_images, test_labels) -> float:
    return sum(train_victim(images, labels, test_images, test_labels, 10, arch="cnn-small", epochs=EPOCHS,
                            seed=s).last for s in SEEDS) / len(SEEDS)


@pytest.fixture(scope="module")
def small():
    """The demo sets at 16 x 16 and the clean victims' mean accuracy."""
    train, test = demo_sets()
    x, xt = _down(train.images), _down(test.images)
    acc = _accuracy(x, train.labels, xt, test.labels)
    assert acc > 0.3, "the clean victim should learn well above chance (10%)"
    return x, train.labels, train.classes, xt, test.labels, acc


CASES = [("cuda", 0.08, {"seed": 7}),  # cuda: a fixed key, so the test is reproducible
         ("hypo", 0.04, {}), ("sep", 0.025, {}), ("aue", 0.06, {}), ("aap", 0.05, {}), ("ap", 0.055, {}),
         ("tap", 0.06, {}), ("rem", 0.065, {"adv_steps": 1}), ("em", 0.08, {}), ("em-classwise", 0.08, {})]


@pytest.mark.slow
@pytest.mark.parametrize("method, threshold, settings", CASES, ids=[c[0] for c in CASES])
def test_protected_set_is_less_learnable(small, tmp_path, method, threshold, settings):
    x, y, classes, xt, yt, clean = small
    m = ue_fast.protect((x.permute(0, 2, 3, 1).numpy(), y.numpy(), classes), tmp_path / "p", method=method,
                        preset="cpu-small", device="cpu", progress=False, **settings)
    prot = read_image_folder(tmp_path / "p", progress=False)
    assert prot.labels.tolist() == y.tolist() and m["budget"]["holds"]
    acc = _accuracy(prot.images, y, xt, yt)
    print(f"victim test accuracy (mean of seeds {SEEDS}): clean {clean:.3f}, {method} {acc:.3f}")
    assert acc < clean - threshold
