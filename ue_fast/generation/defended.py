"""Differentiable forms of the defences a protection must survive (``protect --robust``).

Each is a function ``f(x, u)`` of float images x [B, 3, H, W] in [0, 1] and per-image uniform
draws u [B] (its parameter), differentiable in x, whose forward agrees with the defence of
the same name in ``ue_fast.evaluate.defenses`` up to the quantisation that defence applies
(``tests/test_robust.py``):

==========  ======================================================================
jpeg        kornia's differentiable JPEG codec (``kornia.enhance.jpeg_codec_differentiable``,
            Reich et al. 2024), quality drawn per image in ``JPEG_QUALITIES`` (10-30);
            the defence: Pillow's JPEG at quality 10 (ISS)
grayscale   ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) on all 3 channels; the defence
            rounds it to 8 bits as Pillow does
bdr         bit-depth reduction to ``bits`` drawn per image in ``BDR_BITS`` (2-4); the
            rounding has no gradient, so a straight-through estimator passes the
            identity's (the defence: 2 bits, APBench's)
==========  ======================================================================

:class:`EOT` draws, per image and per step, one of the named defences or none (expectation
over transformation), from the run's generator through the batch's ``Draws``, so a run is
reproducible and, under torchrun, every process draws what one process would.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

JPEG_QUALITIES = (10, 30)  # inclusive: ISS's attack quality is 10 (10-90 measured no better)
SHARE = 0.5  # the probability an image is defended at a step (2/3 and 0.34 measured worse)
BDR_BITS = (2, 4)  # inclusive: APBench's 2 bits; 5 and more barely change an 8-bit perturbation
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert("L") (19595, 38470, 7471) / 65536


def _levels(u: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Integers uniform in [lo, hi] from uniform draws u."""
    return (lo + torch.floor(u * (hi - lo + 1))).clamp_(lo, hi)


def jpeg(x: torch.Tensor, u: torch.Tensor, qualities: tuple[int, int] = JPEG_QUALITIES) -> torch.Tensor:
    """A differentiable JPEG round trip of each image at a quality drawn from ``u`` in ``qualities``."""
    try:
        from kornia.enhance import jpeg_codec_differentiable
    except ImportError as e:
        raise ImportError("--robust jpeg runs kornia's differentiable JPEG codec: pip install 'ue-fast[kornia]'") from e
    q = _levels(u, *qualities).to(device=x.device, dtype=torch.float32)
    return jpeg_codec_differentiable(x, q).to(x.dtype)


def grayscale(x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's luma on its three channels."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


def bdr(x: torch.Tensor, u: torch.Tensor, bits: tuple[int, int] = BDR_BITS) -> torch.Tensor:
    """The ``bits`` most significant bits of each 8-bit value (a number of bits drawn from ``u``
    in ``bits``), with the identity's gradient."""
    step = 2.0 ** (8 - _levels(u, *bits)).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    kept = torch.floor(torch.round(x.detach() * 255) / step) * step / 255
    return x + (kept - x.detach())


ROBUST = {"jpeg": jpeg, "grayscale": grayscale, "bdr": bdr}


def check_robust(names) -> tuple[str, ...]:
    """The defence names of ``--robust`` (a list or a comma-separated string), each once, in the
    registry's order; a name without a differentiable form is refused, naming those that have one."""
    from ..evaluate.defenses import DEFENSES

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names or [])
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"robust names the defences to survive, e.g. 'jpeg,grayscale'; got {names!r}")
    for n in names:
        if n not in DEFENSES:
            raise ValueError(f"unknown defence {n!r} for robust: the defences are {', '.join(DEFENSES)}")
        if n not in ROBUST:
            raise ValueError(f"defence {n!r} has no differentiable form to optimise through; robust takes "
                             f"{', '.join(ROBUST)}")
    if len(set(names)) != len(names):
        raise ValueError(f"robust names a defence twice: {names}")
    return tuple(n for n in ROBUST if n in names)


def _range(name: str, value, lo: int, hi: int) -> tuple[int, int]:
    """An inclusive integer range within [lo, hi], from (a, b), [a, b], "a-b" or a single a."""
    v = value
    if isinstance(v, str):
        parts = v.split("-")
        try:
            v = tuple(int(p) for p in parts)
        except ValueError:
            v = None
    elif isinstance(v, int) and not isinstance(v, bool):
        v = (v,)
    elif isinstance(v, (tuple, list)) and all(isinstance(p, int) and not isinstance(p, bool) for p in v):
        v = tuple(v)
    else:
        v = None
    if v is not None and len(v) == 1:
        v = (v[0], v[0])
    if v is None or len(v) != 2 or not lo <= v[0] <= v[1] <= hi:
        raise ValueError(f"robust setting {name} is a range of integers within {lo}-{hi}, as 'a-b' or one "
                         f"integer; got {value!r}")
    return v


@dataclass(frozen=True)
class RobustSettings:
    """How ``--robust`` draws the defences (``--robust-set KEY=VALUE``; Python: ``robust_settings``).

    share: the probability that an image is defended at a step (then one of the named defences,
        each equally likely; len(names) / (len(names) + 1) makes every defence as likely as none).
    surrogate: whether the surrogate also trains on defended inputs; by default only the PGD
        passes optimise through the defences (a defended surrogate weakened the protection in
        every pair measured: ``benchmarks/results/robust-cnn-small-cpu-2026-12-07.md``).
    jpeg_quality: the range JPEG's quality is drawn from (inclusive, within 1-100).
    bdr_bits: the range the bit depth is drawn from (inclusive, within 1-7).
    """

    share: float = SHARE
    surrogate: bool = False
    jpeg_quality: tuple[int, int] = JPEG_QUALITIES
    bdr_bits: tuple[int, int] = BDR_BITS

    @classmethod
    def from_dict(cls, values: dict | None) -> "RobustSettings":
        """Checked settings from ``{key: value}`` (values as Python objects or the CLI's strings)."""
        values = dict(values or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"robust has no setting(s) {unknown}; its settings: {', '.join(known)}")
        out = {}
        if values.get("share") is not None:
            share = values["share"]
            try:
                share = float(share)
            except (TypeError, ValueError):
                share = None
            if share is None or not 0 < share <= 1:
                raise ValueError(f"robust setting share is a probability in (0, 1]; got {values['share']!r}")
            out["share"] = share
        if "surrogate" in values:
            v = values["surrogate"]
            if isinstance(v, str) and v.lower() in ("true", "yes", "1", "false", "no", "0"):
                v = v.lower() in ("true", "yes", "1")
            if not isinstance(v, bool):
                raise ValueError(f"robust setting surrogate is true or false; got {values['surrogate']!r}")
            out["surrogate"] = v
        if "jpeg_quality" in values:
            out["jpeg_quality"] = _range("jpeg_quality", values["jpeg_quality"], 1, 100)
        if "bdr_bits" in values:
            out["bdr_bits"] = _range("bdr_bits", values["bdr_bits"], 1, 7)
        return cls(**out)

    def to_dict(self) -> dict:
        return {"share": self.share, "surrogate": self.surrogate, "jpeg_quality": list(self.jpeg_quality),
                "bdr_bits": list(self.bdr_bits)}


class EOT:
    """Expectation over transformation: per image, none or one of ``names`` with its parameter,
    from two uniform draws per image: a defence with probability ``settings.share`` (by default
    0.5), each of them equally likely, with its parameter drawn in ``settings``' range."""

    def __init__(self, names, settings: RobustSettings | None = None):
        self.names = check_robust(names)
        self.settings = settings or RobustSettings()
        self._params = {"jpeg": {"qualities": self.settings.jpeg_quality}, "bdr": {"bits": self.settings.bdr_bits}}

    def __call__(self, x: torch.Tensor, draws) -> torch.Tensor:
        """x [B, 3, H, W] in [0, 1]; ``draws`` a batch's ``Draws`` (or anything with
        ``rand(rows, *shape)``). Returns the defended images, differentiable in x."""
        u = draws.rand(len(x), 2)
        n, share = len(self.names), self.settings.share
        # u < 1 - share: none (0); above it, the defences in equal parts of the share
        k = (torch.floor((u[:, 0] - (1 - share)) / share * n) + 1).clamp_(1, n)
        which = torch.where(u[:, 0] < 1 - share, torch.zeros_like(k), k).long()
        out = x
        for k, name in enumerate(self.names, 1):
            rows = (which == k).nonzero().flatten()
            if len(rows):
                dev_rows = rows.to(x.device)
                defended = ROBUST[name](x.index_select(0, dev_rows), u[rows, 1], **self._params.get(name, {}))
                out = out.index_copy(0, dev_rows, defended)
        return out

    def __repr__(self) -> str:
        return f"EOT({', '.join(self.names)})"


__all__ = ["BDR_BITS", "EOT", "JPEG_QUALITIES", "ROBUST", "RobustSettings", "check_robust", "bdr", "grayscale", "jpeg"]
