"""SALM-style sparse perturbations: any per-sample surrogate method, on salient pixels only.

``Sparse(method, percent)`` runs ``method`` unchanged except that its PGD passes move
only the ``percent`` % most salient pixels of each image (``ue_fast.generation.saliency``:
input-gradient magnitude of the surrogate), taken once at the start of the first pass,
when the surrogate has trained (or pre-trained) as the method prescribes.
"""
from __future__ import annotations

from .base import SurrogateMethod


class Sparse:
    """``method`` (a per-sample ``SurrogateMethod``) restricted to each image's most salient pixels."""

    def __init__(self, method, percent: float):
        if not isinstance(method, SurrogateMethod) or method.classwise:
            kind = "class-wise" if getattr(method, "classwise", False) else "training-free"
            raise ValueError(f"sparse (SALM) needs per-sample perturbations from a surrogate; method "
                             f"{method.name!r} is {kind}")
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 100:
            raise ValueError(f"sparse must be a percentage in (0, 100], got {percent!r}")
        self.method, self.percent = method, percent
        self.name, self.config, self.classwise = method.name, method.config, False

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

    def stages(self):
        return self.method.stages()

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state)

    def perturbations(self):
        return self.method.perturbations()

    def read_perturbations(self, start: int, stop: int):
        return self.method.read_perturbations(start, stop)

    @property
    def store(self):
        return self.method.store

    @property
    def data(self):
        return self.method.data
