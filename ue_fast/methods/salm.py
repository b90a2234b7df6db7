"""SALM-style sparse perturbations: any per-sample surrogate method, on salient pixels only.

``Sparse(method, percent)`` runs ``method`` unchanged except that its PGD passes move
only the ``percent`` % most salient pixels of each image (``ue_fast.generation.saliency``:
input-gradient magnitude of the surrogate), taken once at the start of the first pass,
when the surrogate has trained (or pre-trained) as the method prescribes.
"""
from __future__ import annotations

from .base import MethodWrapper, SurrogateMethod


class Sparse(MethodWrapper):
    """``method`` (a per-sample ``SurrogateMethod``) restricted to each image's most salient pixels."""

    def __init__(self, method, percent: float):
        if not isinstance(method, SurrogateMethod) or method.classwise:
            kind = "class-wise" if getattr(method, "classwise", False) else "training-free"
            raise ValueError(f"sparse (SALM) needs per-sample perturbations from a surrogate; method "
                             f"{method.name!r} is {kind}")
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 100:
            raise ValueError(f"sparse must be a percentage in (0, 100], got {percent!r}")
        super().__init__(method)
        self.percent = percent

    def settings(self) -> dict:
        return {**self.method.settings(), "sparse": self.percent}

    def budget(self) -> dict:
        return {**self.method.budget(), "sparse_percent": self.percent}

    def setup(self, ctx, images, labels, num_classes) -> None:
        from ..generation.saliency import dataset_saliency

        m = self.method
        m.streams, m.streams_why = False, "SALM's saliency mask is held in memory, N x H x W bytes"
        m.setup(ctx, images, labels, num_classes)
        m.pgd.mask_source = lambda: dataset_saliency(m.surrogate, m.data, self.percent, m.config.poison_batch_size)
