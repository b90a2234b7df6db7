"""Algorithm settings (``ue_fast.methods.settings``): presets of every method, ``--set KEY=VALUE``,
and refusal of an unknown key or a bad value before anything is read or written."""
import pytest

import ue_fast
from _helpers import demo_subset
from ue_fast.cli import main as cli_main
from ue_fast.methods import METHODS, SurrogateMethod
from ue_fast.methods.settings import parse_sets, parse_value


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_valid_paper_and_cpu_small_presets(name):
    cls = METHODS[name]
    assert {"paper", "cpu-small"} <= set(cls.presets)
    key = {"seed": 7} if cls.keyed else {}  # a keyed method draws a fresh seed (its key) per config
    assert cls.config_class(**cls.preset("paper"), **key) == cls.config_class(**key)  # paper: the defaults
    small = cls.config_class(**cls.preset("cpu-small"))
    if issubclass(cls, SurrogateMethod):
        assert small.arch == ("linear" if name == "pil" else "cnn-small")  # pil: its linear surrogate at any scale
    with pytest.raises(ValueError, match="no preset 'fast'"):
        cls.preset("fast")


def test_parse_values():
    assert parse_value("8") == 8 and parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("None") is None and parse_value("supcon") == "supcon"
    assert parse_value("2/255") == pytest.approx(2 / 255)
    assert parse_sets(["alpha=0.8/255", "post-aug=False"]) == {"alpha": pytest.approx(0.8 / 255), "post_aug": False}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_sets(["alpha"])


def test_cli_preset_and_set_reach_the_config(tmp_path, capsys):
    src = demo_subset(tmp_path / "in", per_class=4)
    out = tmp_path / "o"
    rc = cli_main(["protect", str(src), str(out), "--preset", "cpu-small", "--epochs", "1", "--set", "pgd_steps=1",
                   "--set", "alpha=2/255", "--set", "post_aug=False", "--device", "cpu", "--no-progress"])
    assert rc == 0
    import json

    s = json.loads((out / "manifest.json").read_text())["settings"]
    assert (s["preset"], s["arch"], s["epochs"], s["pgd_steps"], s["post_aug"]) == ("cpu-small", "cnn-small", 1, 1,
                                                                                     False)
    assert s["alpha"] == pytest.approx(2 / 255) and s["batch_size"] == 32  # the preset's


@pytest.mark.parametrize("args, message", [
    (["--set", "temprature=0.5"], "no setting 'temprature'"),
    (["--set", "alpha=-1"], "alpha must be"),
    (["--set", "post_aug=maybe"], "post_aug must be True or False"),
    (["--set", "eps=0.03"], "--eps"),
    (["--epochs", "2", "--set", "epochs=3"], "given both"),
    (["--method", "ops", "--preset", "cpu-small", "--set", "arch=resnet18"], "no setting 'arch'"),
    (["--set", "loss=mse"], "loss must be one of"),
])
def test_cli_refuses_bad_settings_before_reading_or_writing(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    rc = cli_main(["protect", str(tmp_path / "no-such-input"), str(out), *args, "--device", "cpu"])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_python_api_preset_is_overridden_by_explicit_settings(tmp_path):
    with pytest.raises(ValueError, match="no preset"):
        ue_fast.protect(tmp_path / "none", tmp_path / "o", preset="tiny")
    assert not (tmp_path / "o").exists()
