"""What every sink shares: the rows it is given and the context it writes in."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch


@dataclass(frozen=True)
class SinkContext:
    """Where and what a run writes: ``output_dir``; the data set's ``paths`` (its order),
    ``classes``, ``labels`` (int64 [N]) and ``alpha`` (None, or uint8 [N, H, W]); ``shape``
    of one image [3, H, W]; the budget ``eps`` in 1/255; ``memory_limit`` in bytes; and,
    for a class-wise method, ``class_levels()``: its [C, 3, H, W] perturbations in whole
    grey levels (int16), as the images carry them; ``origin`` and ``members`` (a WebDataset
    input's shards and samples, what the webdataset sink passes through)."""

    output_dir: Path
    paths: list
    classes: list
    labels: torch.Tensor
    alpha: object
    shape: tuple
    eps: float
    memory_limit: float
    class_levels: Callable[[], torch.Tensor] | None = None
    origin: dict | None = None  # the data set's origin (a WebDataset input's shards)
    members: object = None  # per row: a WebDataset input's sample (a wds.SampleIndex), a Parquet row (file, row)
    png_level: int = 1  # zlib level of every PNG written (ue_fast.data.png.PNG_LEVEL)
    workers: int = 1  # threads encoding images at once
    method: str = ""  # the method's name (the apbench sink's <type>_poisons folder)
    poison_pt: str = "auto"  # when poison.pt is written: auto, yes or no (ue_fast.data.sinks.poison_pt)

    @property
    def n(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Rows:
    """Rows ``a:b`` of the data set's order: ``protected`` uint8 [B, 3, H, W] (what the images
    carry) and ``effective`` int16 [B, 3, H, W], the change in 1/255 (``protected - clean``)."""

    a: int
    b: int
    protected: torch.Tensor
    effective: torch.Tensor


class Sink:
    """One output format, written by chunks of rows in the data set's order.

    ``planned(ctx)`` lists the files it may write (relative to the output folder), before
    anything is written; ``open(ctx)`` prepares; ``write(rows)`` takes every chunk in
    order; ``close()`` finishes and returns ``{output name: {"written": bool, "why": str}}``
    for the manifest; ``abort()`` lets go of what it holds when the run fails before
    ``close``. A sink never writes outside ``ctx.output_dir``. A ``background`` sink's
    ``write`` runs on a thread of its own, one chunk behind the rows being rounded (its
    chunks still in order): the sinks that encode images, so encoding overlaps the rest."""

    name: ClassVar[str]
    background: ClassVar[bool] = False

    def planned(self, ctx: SinkContext) -> list[str]:
        raise NotImplementedError

    def open(self, ctx: SinkContext) -> None:
        self.ctx = ctx

    def write(self, rows: Rows) -> None:
        pass

    def close(self) -> dict:
        raise NotImplementedError

    def abort(self) -> None:
        pass
