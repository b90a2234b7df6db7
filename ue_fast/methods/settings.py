"""A method's algorithm settings: validated dataclasses, named presets, ``KEY=VALUE`` overrides.

Run options (device, compile, the store's dtype, progress) are not here: they are the
runner's (``ue_fast.generation``). Every method has the presets ``paper`` (its
authors' published settings, which are also its defaults) and ``cpu-small`` (a
schedule that protects measurably on a CPU in minutes; the demo, the tests, the
benchmarks and ``benchmarks/reproduce.py`` use it).
"""
from __future__ import annotations

import ast
import math
from dataclasses import asdict, dataclass, fields


def eps_setting(value) -> None:
    """The L-inf budget in [0, 1] pixel units, in (0, 1]; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"eps must be in (0, 255]/255, got {value!r}")


def int_setting(name: str, value, lo: int = 1) -> None:
    """A setting that must be an int >= ``lo`` (bool refused); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def real_setting(name: str, value, lo: float = 0.0, hi: float = math.inf, *, closed: bool = False) -> None:
    """A setting that must be a finite number in (lo, hi] ([lo, hi] with ``closed``); ValueError otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and (lo <= value if closed else lo < value) and value <= hi
    if not ok:
        raise ValueError(f"{name} must be a finite number in {'[' if closed else '('}{lo:g}, {hi:g}], got {value!r}")


def bool_setting(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def choice_setting(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclass
class Config:
    """Settings every method has: the L-inf budget and the seed."""

    eps: float = 8 / 255  # L-inf budget, in [0, 1] pixel units
    seed: int = 7

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        eps_setting(self.eps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed and numpy's generators take these
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - set(cls.names())
        if unknown:
            raise ValueError(f"unknown settings for {cls.__name__}: {sorted(unknown)}; its settings: {cls.names()}")
        return cls(**d)


@dataclass
class SurrogateConfig(Config):
    """Settings of the methods that optimise against a surrogate network."""

    arch: str = "resnet18"
    epochs: int = 100  # rounds; an upper bound for early-stopping methods
    pgd_steps: int = 10  # PGD steps per batch per round
    alpha: float | None = 0.8 / 255  # PGD step size; None: default_alpha(), a method's fraction of eps
    batch_size: int = 128  # surrogate training
    poison_batch_size: int = 512  # PGD
    lr: float = 0.1
    lr_min: float = 1e-6
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    post_aug: bool = False  # flip the clean image before adding delta (noise that survives flips)

    def __post_init__(self):
        if self.alpha is None:
            eps_setting(self.eps)
            int_setting("pgd_steps", self.pgd_steps)
            self.alpha = self.default_alpha()
        super().__post_init__()

    def default_alpha(self) -> float:
        """The PGD step size when ``alpha`` is None (a method sets its own rule)."""
        raise ValueError("alpha must be a number: this method has no default step size rule")

    def validate(self) -> None:
        super().validate()
        for name in ("epochs", "pgd_steps", "batch_size", "poison_batch_size"):
            int_setting(name, getattr(self, name))
        for name in ("alpha", "lr"):
            real_setting(name, getattr(self, name))
        real_setting("lr_min", self.lr_min, closed=True)
        real_setting("momentum", self.momentum, 0.0, 1.0, closed=True)
        real_setting("weight_decay", self.weight_decay, closed=True)
        bool_setting("post_aug", self.post_aug)
        bool_setting("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        from ..models import SURROGATE_ARCHS

        choice_setting("arch", self.arch, SURROGATE_ARCHS)

    def step_size(self, epoch: int) -> float:
        """PGD step size of round ``epoch`` (1-based); constant unless a method schedules it."""
        return self.alpha

    def learning_rate(self, epoch: int) -> float:
        """Cosine annealing per round, from lr at round 1 towards lr_min."""
        t = (epoch - 1) / self.epochs
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * t))


def parse_value(text: str):
    """``--set`` values: Python literals (``8``, ``0.5``, ``True``, ``None``, ``'a'``), else the text
    itself; ``N/255`` (as ``alpha=2/255``) is a fraction."""
    num, slash, den = text.partition("/")
    if slash:
        try:
            n, d = float(num), float(den)
        except ValueError:
            pass
        else:
            if d == 0:
                raise ValueError(f"--set value {text!r} divides by zero")
            return n / d
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_sets(items) -> dict:
    """``["alpha=2/255", "post_aug=False"]`` -> ``{"alpha": 0.00784..., "post_aug": False}``."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(value.strip())
    return out
