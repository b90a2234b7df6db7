"""``perturbation_int8.npy``: the change every image carries, in 1/255, int8 [N, 3, H, W]
(``perturbation_int16.npy`` when the budget exceeds 127/255, as the one-pixel ``ops``'s
does); written through a hidden temporary file, renamed when complete."""
from __future__ import annotations

import math
import os

import torch

from ...generation.rowfile import RowFile
from .base import Rows, Sink, SinkContext


def npy_name(eps: float) -> str:
    # int8 holds +-127/255; a larger budget (the one-pixel ops) needs int16.
    return "perturbation_int8.npy" if math.floor(eps + 1e-6) <= 127 else "perturbation_int16.npy"


class PerturbationNpy(Sink):
    name = "npy"

    def planned(self, ctx: SinkContext) -> list[str]:
        return [npy_name(ctx.eps)]

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.file = npy_name(ctx.eps)
        self.dtype = torch.int8 if self.file == "perturbation_int8.npy" else torch.int16
        self.tmp = ctx.output_dir / f".{self.file}.tmp"
        self.rows = RowFile.create(self.tmp, (ctx.n, *ctx.shape), self.dtype)

    def write(self, rows: Rows) -> None:
        self.rows.write_range(rows.a, rows.effective.to(self.dtype))

    def close(self) -> dict:
        self.rows.sync()
        self.rows.close()
        os.replace(self.tmp, self.ctx.output_dir / self.file)
        return {self.file: {"written": True, "why": "the perturbations in 1/255, a .npy (np.load(mmap_mode='r'))"}}
