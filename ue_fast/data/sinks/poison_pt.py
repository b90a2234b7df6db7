"""``poison.pt``: float32 perturbations [N, 3, H, W] in [-eps, eps], row i for image i (the
layout the MI-UE and EM evaluation scripts read: protected = clean + poison, exactly, at
8 bits); written only when one such tensor fits the memory budget."""
from __future__ import annotations

import math

import torch

from ..exports import save_poison_pt
from .base import Rows, Sink, SinkContext
from .npy import npy_name


class PoisonPt(Sink):
    name = "poison.pt"

    def planned(self, ctx: SinkContext) -> list[str]:
        return ["poison.pt"]

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.bytes = ctx.n * math.prod(ctx.shape) * 4
        self.pt = torch.empty((ctx.n, *ctx.shape), dtype=torch.float32) if self.bytes <= ctx.memory_limit else None

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
                            "why": f"one float32 tensor of {gb:.3g} GiB would exceed the memory budget of "
                                   f"{self.ctx.memory_limit / 2**30:.3g} GiB (--memory-budget); "
                                   f"{npy_name(self.ctx.eps)} holds the same perturbations (in 1/255), readable "
                                   "by memory map"}}
