"""UDP's simple-network detection score (ue_fast.evaluate.detect): the authors' procedure, a
blatant shortcut detected and clean data not, and the score through evaluate and report."""
import json

import pytest
import torch
import torch.nn.functional as F

from _helpers import demo_sets, ops_protected_subset
from ue_fast.cli import main as cli_main
from ue_fast.evaluate.detect import BOUND, _model, detection_score


def test_the_networks_are_the_authors():
    """model/MLP.py: Linear(D, C), or Linear(D, D) -> ReLU -> Linear(D, C), on flattened pixels."""
    linear, two = _model("linear", 48, 10), _model("2nn", 48, 10)
    assert [type(m).__name__ for m in linear] == ["Flatten", "Linear"]
    assert [type(m).__name__ for m in two] == ["Flatten", "Linear", "ReLU", "Linear"]
    assert (linear[1].in_features, linear[1].out_features) == (48, 10)
    assert (two[1].in_features, two[1].out_features, two[3].out_features) == (48, 48, 10)
    assert BOUND == 0.7


@pytest.fixture(scope="module")
def small():
    """The demo training set at 16 x 16, clean and with a class-wise +-8/255 pattern added."""
    train, _ = demo_sets()
    x = F.interpolate(train.images.float(), size=(16, 16), mode="area").round().to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    patterns = (torch.randint(0, 2, (10, 3, 16, 16), generator=g) * 2 - 1) * 8
    return x, (x.int() + patterns[train.labels]).clamp(0, 255).to(torch.uint8), train.labels


def test_a_class_wise_shortcut_is_detected_and_clean_data_is_not(small):
    """Measured: clean 0.305, patterned 0.95 held out (linear, 100 epochs)."""
    clean, poisoned, labels = small
    c = detection_score(clean, labels, epochs=100)
    p = detection_score(poisoned, labels, epochs=100)
    print(f"held-out accuracy: clean {c['score']:.3f}, patterned {p['score']:.3f}")
    assert p["detected"] and p["score"] > 0.85 and not c["detected"] and c["score"] < 0.5
    assert p["num_train"] == 800 and p["num_held_out"] == 200 and p["model"] == "linear"
    assert detection_score(poisoned, labels, epochs=100) == p  # the seed fixes it


def test_bad_settings_are_refused(small):
    clean, _, labels = small
    with pytest.raises(ValueError, match="2nn"):
        detection_score(clean, labels, model="mlp")
    with pytest.raises(ValueError, match="held_out"):
        detection_score(clean, labels, held_out=1.0)
    with pytest.raises(ValueError, match="epochs"):
        detection_score(clean, labels, epochs=0)
    with pytest.raises(ValueError, match="at least 2"):
        detection_score(clean[:1], labels[:1])


def test_detection_through_evaluate_and_report(tmp_path, capsys):
    """--detect: the score of the protected set and of its clean counterparts (from the manifest),
    printed, in the results; in a report once, cached and reused."""
    train, test, prot = ops_protected_subset(tmp_path, per_class=10)
    out = tmp_path / "r.json"
    args = ["evaluate", "--train", str(prot), "--test", str(test), "--arch", "cnn-small", "--epochs", "1", "--device",
            "cpu", "--no-progress", "--detect", "--detect-epochs", "2", "--out", str(out)]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    d = r["detect"]
    assert d["protected"]["epochs"] == 2 and d["protected"]["num_train"] + d["protected"]["num_held_out"] == 30
    assert d["clean"] is not None and d["difference"] == pytest.approx(d["protected"]["score"] - d["clean"]["score"])
    assert "detection (UDP, a linear network trained 2 epochs on 24 of the training images)" in text
    assert "on the clean counterparts" in text

    rep = tmp_path / "rep"
    common = ["report", str(prot), "--clean", str(train), "--test", str(test), "--out", str(rep), "--archs",
              "cnn-small", "--defenses", "none", "--epochs", "1", "--device", "cpu", "--no-progress", "--detect",
              "--detect-epochs", "2"]
    assert cli_main(common) == 0
    doc = json.loads((rep / "report.json").read_text())
    assert doc["detection"]["protected"]["model"] == "linear" and (rep / "cells" / "detect.json").is_file()
    assert "## Detection" in (rep / "report.md").read_text()
    stamp = (rep / "cells" / "detect.json").stat().st_mtime_ns
    assert cli_main(common) == 0  # resumed: the cached score is reused
    assert (rep / "cells" / "detect.json").stat().st_mtime_ns == stamp
