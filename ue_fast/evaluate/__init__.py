"""Evaluation of protected data: victims trained on it (under defences), tested on clean data.

The package is callable: ``ue_fast.evaluate(train, test, ...)`` is
``ue_fast.evaluate.evaluate(train, test, ...)`` (see ``run.evaluate``), while
``from ue_fast.evaluate import train_victim`` and ``import ue_fast.evaluate``
keep reaching the package.
"""
import sys
import types

from .defenses import DEFENSES, Defense, get_defense
from .pairs import PairMismatchError, PairsWarning, check_pairs
from .plot import plot_curves
from .run import FORMAT, evaluate, gap_se, load_results, summary_lines
from .ud import layer_sharpness, unlearnable_distance
from .victim import DivergenceWarning, VictimResult, divergence, train_victim

__all__ = ["DEFENSES", "FORMAT", "Defense", "DivergenceWarning", "PairMismatchError", "PairsWarning", "VictimResult",
           "check_pairs", "divergence", "evaluate", "gap_se", "get_defense", "layer_sharpness", "load_results",
           "plot_curves", "summary_lines", "train_victim", "unlearnable_distance"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)

    __call__.__doc__ = evaluate.__doc__


sys.modules[__name__].__class__ = _CallableModule
