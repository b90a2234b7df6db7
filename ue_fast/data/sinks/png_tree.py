"""The PNG tree: the input tree mirrored, each image as a lossless PNG (``cat/0001.jpg`` ->
``cat/0001.png``); a JPEG would wash out an 8-bit perturbation."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from ..folders import output_paths
from ..png import _alpha_rows, check_png_level, write_png
from .base import Rows, Sink, SinkContext


class PNGTree(Sink):
    name = "images"
    background = True  # encoding overlaps the rounding of the next chunk

    def planned(self, ctx: SinkContext) -> list[str]:
        return output_paths(ctx.paths, ctx.output_dir)

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.written = output_paths(ctx.paths, ctx.output_dir)  # every collision refused before a file is written
        self._start()

    def _start(self) -> None:
        """The folders of ``self.written`` and the encoder pool."""
        for d in sorted({str(PurePosixPath(o).parent) for o in self.written}):
            (self.ctx.output_dir / d).mkdir(parents=True, exist_ok=True)
        self.level = check_png_level(self.ctx.png_level)
        self.pool = ThreadPoolExecutor(max(1, self.ctx.workers), thread_name_prefix=f"ue_fast-{self.name}")

    def write(self, rows: Rows) -> None:
        images, n = rows.protected.cpu(), rows.b - rows.a
        alpha = None if self.ctx.alpha is None else _alpha_rows(self.ctx.alpha[rows.a:rows.b], n, tuple(images.shape[2:]))

        def one(i: int) -> None:
            write_png(self.ctx.output_dir / self.written[rows.a + i], images[i], None if alpha is None else alpha[i],
                      self.level)

        list(self.pool.map(one, range(n)))

    def close(self) -> dict:
        self.abort()
        return {self.name: {"written": True, "why": f"{self.ctx.n} PNG files mirroring the input tree"}}

    def abort(self) -> None:
        self.pool.shutdown(wait=True)
