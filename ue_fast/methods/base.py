"""What a poison generator is to the shared engine: its settings and its hooks.

A generator is a ``Method`` subclass with a ``GeneratorConfig`` subclass. The engine
(``ue_fast.engine.BiLevelEngine``) runs, for round r = 1..``epochs``:

1. surrogate training: ``train_batches(r)`` batches (None: one epoch) of
   cross-entropy on ``train_input(...)`` (default ``x + delta``), lr ``learning_rate(r)``;
2. the poison pass: the surrogate frozen in eval mode, over the whole set in shuffled
   batches, ``pgd_steps`` steps of ``delta <- proj(delta -+ step_size(r) * sign(grad))``
   on ``poison_loss(features, logits, y)`` of the surrogate at ``poison_input(...)``
   (default ``x + delta``), descending unless ``maximize``;
3. ``finished(engine, stats)`` may end the run early (EM's accuracy criterion).

``pretrain_epochs()`` clean epochs run once before round 1 (AP trains its surrogate
on clean data first and then freezes it: ``train_batches`` returns 0). With
``retrain_epochs() > 0`` step 1 instead re-initialises the surrogate and trains it that
many epochs from scratch. With ``whole_set_loss()`` step 2 differentiates one loss of
the whole set's features per step instead of one loss per batch. A
``classwise`` method keeps one perturbation per class, its gradient summed over
the class's samples. A ``training_free`` method implements ``generate`` instead.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch


def int_setting(name: str, value, lo: int = 1) -> None:
    """A config field that must be an int >= ``lo`` (bool refused); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def real_setting(name: str, value, lo: float = 0.0, hi: float = math.inf, *, closed: bool = False) -> None:
    """A config field that must be a finite number in (lo, hi] ([lo, hi] with ``closed``); ValueError otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and (lo <= value if closed else lo < value) and value <= hi
    if not ok:
        raise ValueError(f"{name} must be a finite number in {'[' if closed else '('}{lo:g}, {hi:g}], got {value!r}")


# The perturbation store's dtypes. float32 accumulates MI-UE's 0.2/255 steps as the authors'
# code does; float16 (the authors' choice for ImageNet-100) has a spacing of at most
# 0.008/255 within 8/255, so it keeps such steps too at half the memory; int8 holds whole
# grey levels only and rounds stochastically (unbiased) after every pass.
DELTA_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


@dataclass
class GeneratorConfig:
    """Settings shared by the generators (each method's subclass sets its paper's defaults)."""

    arch: str = "resnet18"
    epochs: int = 100  # rounds of (surrogate training, poison pass); an upper bound for early-stopping methods
    pgd_steps: int = 10  # PGD steps per batch per round
    eps: float = 8 / 255  # L-inf budget, in [0, 1] pixel units
    alpha: float = 0.8 / 255  # PGD step size
    batch_size: int = 128  # surrogate training
    poison_batch_size: int = 512  # PGD
    lr: float = 0.1
    lr_min: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 1e-4
    post_aug: bool = False  # flip the clean image before adding delta (noise that survives flips)
    seed: int = 7
    # How the perturbation is kept between PGD passes (see DELTA_DTYPES). "auto": float32, or
    # float16 when float32 would not fit the memory budget.
    delta_dtype: str = "auto"
    sparse: float | None = None  # SALM: perturb only this percentage of the most salient pixels

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("epochs", "pgd_steps", "batch_size", "poison_batch_size"):
            int_setting(name, getattr(self, name))
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps <= 1):
            raise ValueError(f"eps must be in (0, 255]/255, got {self.eps * 255:g}/255")
        for name in ("alpha", "lr"):
            real_setting(name, getattr(self, name))
        if self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(f"delta_dtype must be one of {tuple(DELTA_DTYPES)}, got {self.delta_dtype!r}")
        if self.delta_dtype == "int8" and self.eps * 255 > 127 + 1e-6:
            raise ValueError(f"delta_dtype='int8' holds at most 127/255, got eps {self.eps * 255:g}/255")
        if self.sparse is not None and not (isinstance(self.sparse, (int, float)) and 0 < self.sparse <= 100):
            raise ValueError(f"sparse must be a percentage in (0, 100], got {self.sparse!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown settings for {cls.__name__}: {sorted(unknown)}")
        return cls(**d)

    def step_size(self, epoch: int) -> float:
        """PGD step size of round ``epoch`` (1-based); constant unless a method schedules it."""
        return self.alpha

    def learning_rate(self, epoch: int) -> float:
        """Cosine annealing per round, from lr at round 1 towards lr_min."""
        t = (epoch - 1) / self.epochs
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * t))


class Method:
    """Base of the generators: the hooks of the engine's loop, with the defaults MI-UE uses."""

    name = "base"
    config_class = GeneratorConfig
    maximize = False  # PGD ascends the poison loss
    classwise = False  # one perturbation per class
    training_free = False  # ``generate`` makes the perturbation; no surrogate, no engine loop

    def __init__(self, config: GeneratorConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes

    def pretrain_epochs(self) -> int:
        """Clean surrogate epochs before round 1 (their lr follows ``pretrain_lr``): the
        config's ``pretrain_epochs`` where a method has one, else none."""
        return getattr(self.config, "pretrain_epochs", 0)

    def pretrain_lr(self, epoch: int) -> float:
        n = max(self.pretrain_epochs(), 1)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / n))

    def train_batches(self, epoch: int) -> int | None:
        """Surrogate batches in round ``epoch``: None for one epoch, 0 for none."""
        return None

    def retrain_epochs(self) -> int:
        """Epochs of a freshly initialised surrogate at the start of every round (lr cosine
        from ``lr`` to 0 within the round), replacing ``train_batches``: the config's
        ``retrain_epochs`` where a method has one, else 0 (keep training one surrogate)."""
        return getattr(self.config, "retrain_epochs", 0)

    def whole_set_loss(self) -> bool:
        """True: each PGD step takes ``poison_loss`` of all N samples' features at once
        (computed batch by batch without a graph, then back-propagated batch by batch), so
        a loss coupling samples, like the Bayes-error estimate, sees the whole set. Needs a
        deterministic ``poison_input``: both passes must see the same input."""
        return getattr(self.config, "whole_set", False)

    def train_input(self, engine, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The surrogate's training input for clean x and perturbation delta [B, 3, H, W]."""
        return x + delta

    def poison_input(self, engine, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The input whose poison loss is differentiated w.r.t. delta (differentiable in delta)."""
        return x + delta

    def poison_loss(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finished(self, engine, stats: dict) -> bool:
        """End the run after this round (``stats`` is the round's history entry)."""
        return False

    def generate(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                 device: torch.device) -> torch.Tensor:
        """Training-free methods: float perturbations [N, 3, H, W] within eps (on ``device``)."""
        raise NotImplementedError
