"""``poison.pt``: float32 perturbations [N, 3, H, W] in [-eps, eps], row i for image i (the
layout the MI-UE and EM evaluation scripts read: protected = clean + poison, exactly, at
8 bits). Being one tensor it is written only when it fits the memory budget, and by default
(``poison_pt="auto"``) only up to ``POISON_PT_AUTO``: above it the float32 copy of what the
``.npy`` holds costs most of a large run's writing (2,000 images at 224 px: 1.2 GB, 5.5 of
its ~20 s on 2 cores)."""
from __future__ import annotations

import math

import torch

from ..exports import save_poison_pt
from .base import Rows, Sink, SinkContext
from .npy import npy_name

POISON_PT_MODES = ("auto", "yes", "no")
# The largest poison.pt "auto" writes: CIFAR-10 and CIFAR-100 (50,000 x 3 x 32 x 32 x 4 bytes = 0.57 GiB)
# and SVHN (73,257: 0.84 GiB) whole, the sets the MI-UE and EM evaluation scripts read it for.
POISON_PT_AUTO = 1 << 30


class PoisonPt(Sink):
    name = "poison.pt"

    def planned(self, ctx: SinkContext) -> list[str]:
        return ["poison.pt"]

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.bytes = ctx.n * math.prod(ctx.shape) * 4
        self.why_not = self._why_not(ctx)
        self.pt = torch.empty((ctx.n, *ctx.shape), dtype=torch.float32) if self.why_not is None else None

    def _why_not(self, ctx: SinkContext) -> str | None:
        gb = self.bytes / 2**30
        if ctx.poison_pt == "no":
            return "poison_pt='no' (--poison-pt no)"
        if self.bytes > ctx.memory_limit:
            return (f"one float32 tensor of {gb:.3g} GiB would exceed the memory budget of "
                    f"{ctx.memory_limit / 2**30:.3g} GiB (--memory-budget)")
        if ctx.poison_pt == "auto" and self.bytes > POISON_PT_AUTO:
            return (f"one float32 tensor of {gb:.3g} GiB is over the {POISON_PT_AUTO / 2**30:g} GiB that "
                    "--poison-pt auto writes (--poison-pt yes writes it)")
        return None

    def write(self, rows: Rows) -> None:
        if self.pt is not None:
            torch.div(rows.effective, 255, out=self.pt[rows.a:rows.b])

    def close(self) -> dict:
        gb, path = self.bytes / 2**30, self.ctx.output_dir / "poison.pt"
        if self.pt is not None:
            save_poison_pt(path, self.pt)
            self.pt = None
            return {self.name: {"written": True, "why": f"float32 perturbations, {gb:.3g} GiB, fit the memory budget"}}
        path.unlink(missing_ok=True)  # an earlier run's, in a folder this run replaces
        return {self.name: {"written": False,
                            "why": f"{self.why_not}; {npy_name(self.ctx.eps)} holds the same perturbations (in "
                                   "1/255), readable by memory map"}}
