"""The PNG tree: the input tree mirrored, each image as a lossless PNG (``cat/0001.jpg`` ->
``cat/0001.png``); a JPEG would wash out an 8-bit perturbation."""
from __future__ import annotations

from pathlib import PurePosixPath

from ..folders import output_paths, write_image_folder
from .base import Rows, Sink, SinkContext


class PNGTree(Sink):
    name = "images"

    def planned(self, ctx: SinkContext) -> list[str]:
        return output_paths(ctx.paths, ctx.output_dir)

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.written = output_paths(ctx.paths, ctx.output_dir)  # every collision refused before a file is written
        for d in sorted({str(PurePosixPath(o).parent) for o in self.written}):
            (ctx.output_dir / d).mkdir(parents=True, exist_ok=True)

    def write(self, rows: Rows) -> None:
        alpha = self.ctx.alpha
        write_image_folder(self.ctx.output_dir, rows.protected, self.ctx.paths[rows.a:rows.b], progress=False,
                           alpha=None if alpha is None else alpha[rows.a:rows.b], compress_level=self.ctx.png_level,
                           workers=self.ctx.workers)

    def close(self) -> dict:
        return {self.name: {"written": True, "why": f"{self.ctx.n} PNG files mirroring the input tree"}}
