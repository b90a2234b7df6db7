"""``--robust``: any surrogate method optimised through differentiable forms of the defences
its protection must survive (expectation over transformation).

``Robust(method, ["jpeg", "grayscale"])`` runs ``method`` unchanged except that the inputs
of its PGD passes are first passed through :class:`ue_fast.generation.defended.EOT`: per image
and per step, with probability ``share`` (0.5) one of the named defences with a drawn parameter
(JPEG quality 10-30, bit depth 2-4), else none; differentiable in the perturbation (kornia's
JPEG codec; a straight-through estimator for bit-depth reduction). So the perturbation must
move the surrogate's loss after a JPEG re-encode or a grayscale conversion as well as without
(EOT, Athalye et al. 2018). ``RobustSettings`` (``--robust-set``) sets the share, the ranges,
and whether the surrogate also trains on defended inputs (``surrogate=true``: both levels of
the bi-level problem see the defences, as in ARMOR's augmentation-aware surrogate, 2025, and
REM's min-min-max against adversarial training, Fu et al. 2022, with an adversary as the
transformation). That is off by default because it weakened the protection in each pair
measured (``benchmarks/results/robust-cnn-small-cpu-2026-12-07.md``): a surrogate that has
learnt to see through the defences is a poor target for an error-minimising perturbation.

The budget stays the method's L-inf ball, and the output is checked against it as always.
Why JPEG and grayscale: ISS (Liu et al. 2023) shows that grayscale removes perturbations that
live in colour (low-frequency, class-wise colour shifts as in EM, REM) and JPEG-10 removes
high-frequency ones (sample-wise PGD noise), which is why one defence alone leaves some
protections standing and the two together remove most. AUE/AAP (Wang et al. 2024) harden
against augmentations by a stronger augmentation in the surrogate's training. Semantic Deep
Hiding (Meng et al. 2024, arXiv 2406.17349) and DUNE (Wang et al. 2026, arXiv 2605.01718)
report robustness to JPEG and grayscale together by leaving the pixel-wise L-inf form:
hidden semantic images, and separate spatial and colour-domain branches. What we measured
agrees with that: under one L-inf ball, a perturbation that survives grayscale must put its
budget in luma, which is taken from the colour that protects best without a defence; and
JPEG-10 keeps only each 8x8 block's lowest frequencies, quantised in steps larger than a
change of 8/255 can move them (the mean's step is 10 grey levels). So EOT trades the
no-defence protection for the defences': at CPU scale EM kept 0.47 of its gap under JPEG-10
and under grayscale with jpeg,grayscale,bdr, MI-UE none under JPEG-10 in any mix
(``benchmarks/results/robust-cnn-small-cpu-2026-12-07.md``).

Not supported: SEP (its attack runs an ensemble of snapshots, not the surrogate's passes),
a whole-set pass (Bayes's: its two passes over the data must see the same inputs), and the
training-free methods (no surrogate to optimise through).
"""
from __future__ import annotations

import warnings

from ..generation.defended import EOT, RobustSettings, check_robust
from .base import MethodWrapper, SurrogateMethod
from .salm import Sparse


class RobustExperimentalWarning(UserWarning):
    """robust is not yet shown to keep a protection's gaps under the defences it names."""


class Robust(MethodWrapper):
    """``method`` (a ``SurrogateMethod``, or one made ``Sparse``) hardened against ``defences``."""

    def __init__(self, method, defences, settings: dict | RobustSettings | None = None):
        inner = method.method if isinstance(method, Sparse) else method
        if not isinstance(inner, SurrogateMethod):
            raise ValueError(f"robust optimises a surrogate's perturbation through the defences; method "
                             f"{method.name!r} is training-free")
        if inner.name == "sep":
            raise ValueError("robust does not apply to sep: its attack runs an ensemble of snapshots, not the "
                             "surrogate's PGD passes that robust goes through")
        if getattr(inner.config, "whole_set", False):
            raise ValueError(f"robust does not apply to {inner.name}'s whole-set pass: it computes every batch twice "
                             "and needs the same inputs both times, not defences drawn at random "
                             "(--set ascent=sign --set whole_set=False runs its per-batch pass)")
        self.defences = check_robust(defences)
        self.robust_settings = settings if isinstance(settings, RobustSettings) else RobustSettings.from_dict(settings)
        warnings.warn("robust is experimental: measured at CPU scale it kept less than half of a protection's gap "
                      "under JPEG-10 and grayscale, at a cost to the gap without a defence (docs/methods.md); check "
                      "the result with `ue-fast report` before relying on it", RobustExperimentalWarning, stacklevel=3)
        self.eot = EOT(self.defences, self.robust_settings)
        super().__init__(method)
        self.inner = inner

    def settings(self) -> dict:
        return {**self.method.settings(), "robust": list(self.defences),
                "robust_settings": self.robust_settings.to_dict()}

    def setup(self, ctx, images, labels, num_classes) -> None:
        self.method.setup(ctx, images, labels, num_classes)
        m = self.inner
        defend = _Defend(self.eot, m.data)
        m.pgd.input_transform = defend
        if self.robust_settings.surrogate:
            m.surrogate.input_transform = defend


class _Defend:
    """The defences drawn for the current batch: ``eot`` with ``data``'s draws. It holds no
    reference to the method, so method, passes and surrogate form no reference cycle: a cycle
    would outlive the run until the interpreter's final collection, and under torchrun the
    process group it reaches would then be destroyed while Python shuts down (gloo's thread
    aborts the process)."""

    def __init__(self, eot: EOT, data):
        self.eot, self.data = eot, data

    def __call__(self, x):
        return self.eot(x, self.data.draws())
