"""Differentiable forms of the defences a protection must survive (``protect --robust``).

Each is a function ``f(x, u)`` of float images x [B, 3, H, W] in [0, 1] and per-image uniform
draws u [B] (its parameter), differentiable in x, whose forward agrees with the defence of
the same name in ``ue_fast.evaluate.defenses`` up to the quantisation that defence applies
(``tests/test_robust.py``):

==========  ======================================================================
jpeg        kornia's differentiable JPEG codec (``kornia.enhance.jpeg_codec_differentiable``,
            Reich et al. 2024), quality drawn per image in ``JPEG_QUALITIES`` (10-90);
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

import torch

JPEG_QUALITIES = (10, 90)  # inclusive: ISS's attack quality is 10, a photo's usual 75-90
BDR_BITS = (2, 4)  # inclusive: APBench's 2 bits; 5 and more barely change an 8-bit perturbation
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert("L") (19595, 38470, 7471) / 65536


def _levels(u: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Integers uniform in [lo, hi] from uniform draws u."""
    return (lo + torch.floor(u * (hi - lo + 1))).clamp_(lo, hi)


def jpeg(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A differentiable JPEG round trip of each image at a quality drawn from ``u``."""
    try:
        from kornia.enhance import jpeg_codec_differentiable
    except ImportError as e:
        raise ImportError("--robust jpeg runs kornia's differentiable JPEG codec: pip install 'ue-fast[kornia]'") from e
    q = _levels(u, *JPEG_QUALITIES).to(device=x.device, dtype=torch.float32)
    return jpeg_codec_differentiable(x, q).to(x.dtype)


def grayscale(x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's luma on its three channels."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


def bdr(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The ``bits`` most significant bits of each 8-bit value (bits drawn from ``u``), with the
    identity's gradient."""
    step = 2.0 ** (8 - _levels(u, *BDR_BITS)).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
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


class EOT:
    """Expectation over transformation: per image, none or one of ``names`` (each with
    probability 1 / (len(names) + 1)) with its parameter, from two uniform draws per image."""

    def __init__(self, names):
        self.names = check_robust(names)

    def __call__(self, x: torch.Tensor, draws) -> torch.Tensor:
        """x [B, 3, H, W] in [0, 1]; ``draws`` a batch's ``Draws`` (or anything with
        ``rand(rows, *shape)``). Returns the defended images, differentiable in x."""
        u = draws.rand(len(x), 2)
        which = torch.floor(u[:, 0] * (len(self.names) + 1)).clamp_(max=len(self.names)).long()  # 0: none
        out = x
        for k, name in enumerate(self.names, 1):
            rows = (which == k).nonzero().flatten()
            if len(rows):
                dev_rows = rows.to(x.device)
                out = out.index_copy(0, dev_rows, ROBUST[name](x.index_select(0, dev_rows), u[rows, 1]))
        return out

    def __repr__(self) -> str:
        return f"EOT({', '.join(self.names)})"


__all__ = ["BDR_BITS", "EOT", "JPEG_QUALITIES", "ROBUST", "check_robust", "bdr", "grayscale", "jpeg"]
