"""``--robust``: any surrogate method optimised through differentiable forms of the defences
its protection must survive (expectation over transformation).

``Robust(method, ["jpeg", "grayscale"])`` runs ``method`` unchanged except that every input
the surrogate sees is first passed through :class:`ue_fast.generation.defended.EOT`: per image
and per step, none or one of the named defences with a drawn parameter (JPEG quality 10-90,
bit depth 2-4), differentiable in the perturbation (kornia's JPEG codec; a straight-through
estimator for bit-depth reduction). Both levels of the bi-level problem see it:

- the PGD passes (per batch and class-wise) optimise the perturbation through it, so it must
  move the surrogate's loss after a JPEG re-encode or a grayscale conversion as well as
  without (EOT, Athalye et al. 2018);
- the surrogate trains on defended inputs (clean pre-training and the rounds on perturbed
  data), as a victim that applies the defence would, so the perturbation is optimised
  against a model that has learnt to see through it (ARMOR's augmentation-aware surrogate,
  2025; REM's robust min-min-max against adversarial training, Fu et al. 2022, is the same
  idea with an adversary as the transformation).

The budget stays the method's L-inf ball, and the output is checked against it as always.
Why JPEG and grayscale: ISS (Liu et al. 2023) shows that grayscale removes perturbations that
live in colour (low-frequency, class-wise colour shifts as in EM, REM) and JPEG-10 removes
high-frequency ones (sample-wise PGD noise), which is why one defence alone leaves some
protections standing and the two together remove most (our report: MI-UE keeps -1.5 of its
26.5-point gap under JPEG-10 and 6.0 under grayscale). AUE/AAP (Wang et al. 2024) harden
against augmentations by a stronger augmentation in the surrogate's training; this wrapper
does that for the defences themselves, for any surrogate method.

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
    """robust is not yet shown to harden anything (its first measurement weakened MI-UE's protection)."""


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
        warnings.warn("robust is experimental: its first measurement (MI-UE, cpu-small, cnn-small victims) weakened "
                      "the protection instead of hardening it (no-defence gap 26.5 -> 7.0 points); check the "
                      "result with `ue-fast report` before relying on it (docs/methods.md)",
                      RobustExperimentalWarning, stacklevel=3)
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
