"""benchmarks/reproduce.py's command-line pieces that need no CIFAR-10 run."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "reproduce", Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)


def test_set_overrides_parse_literals_and_strings():
    got = reproduce._overrides(["bayes.retrain_epochs=30", "bayes.whole_set=True", "bayes.feature_scale=l2",
                                "bayes.alpha=0.004", "ap.pgd_steps=5", "bayes.sigma=None"], ["bayes", "ap"])
    assert got == {"bayes": {"retrain_epochs": 30, "whole_set": True, "feature_scale": "l2", "alpha": 0.004,
                             "sigma": None},
                   "ap": {"pgd_steps": 5}}
    assert reproduce._overrides([], ["miue"]) == {}


@pytest.mark.parametrize("item, match", [
    ("bayes.whole_set", "METHOD.KEY=VALUE"), ("whole_set=True", "METHOD.KEY=VALUE"),
    ("bayes.=1", "METHOD.KEY=VALUE"), ("em.epochs=3", "'em' is not among --methods"),
])
def test_set_overrides_refuse_malformed_items(item, match):
    with pytest.raises(ValueError, match=match):
        reproduce._overrides([item], ["bayes"])
