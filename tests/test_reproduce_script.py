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


def test_protect_keywords_keep_eps_units_and_a_fixed_key(tmp_path):
    """The preset goes by name (SEP's cpu-small sets eps 8/255 in config units, which as protect's
    eps argument, in 1/255, would mean 8/255/255); a --set eps is converted; cuda gets seed 7."""
    import ue_fast
    from _helpers import demo_subset

    kw = reproduce._protect_kwargs(["sep", "cuda", "em"], "small", {"em": {"eps": 4 / 255}})
    assert kw["sep"] == {"preset": "cpu-small"} and kw["cuda"] == {"preset": "cpu-small", "seed": 7}
    assert kw["em"] == {"preset": "cpu-small", "eps": pytest.approx(4.0)}
    src = demo_subset(tmp_path / "in", per_class=2)
    m = ue_fast.protect(src, tmp_path / "o", method="sep", device="cpu", progress=False, pretrain_epochs=1, members=1,
                        pgd_steps=1, vr_steps=1, **kw["sep"])
    assert m["settings"]["eps_255"] == 8.0 and m["linf_max_255"] > 0
