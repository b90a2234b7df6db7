"""Parquet out (``--output-format parquet``): one file per input file (``<name>.parquet``; a
``save_to_disk`` folder's ``.arrow`` files become Parquet too), its rows in order with every
column as it was, the schema and its ``datasets`` features kept, and the image column's
bytes the protected image as PNG (lossless; a struct's ``path`` gets the ``.png`` suffix).
Readable by pyarrow alone and by ``datasets.load_dataset("parquet", ...)``. Rows skipped
on input (``--skip-bad``) are left out. A file's images are held until its last row comes,
then it is written under a hidden temporary name and renamed. Needs a table input."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..png import encode_pngs
from ..tables import batches, pyarrow
from .base import Rows, Sink, SinkContext


class ParquetFiles(Sink):
    name = "parquet"

    def _names(self, ctx: SinkContext) -> list[str]:
        names = [Path(f).stem + ".parquet" for f in ctx.origin["files"]]
        if len(set(names)) != len(names):
            raise ValueError("two input files share a name, so their outputs would too")
        return names

    def planned(self, ctx: SinkContext) -> list[str]:
        if ctx.members is None or (ctx.origin or {}).get("format") not in ("parquet", "arrow"):
            return []
        names = self._names(ctx)
        return [names[i] for i in sorted({f for f, _ in ctx.members})]

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        if ctx.members is None or (ctx.origin or {}).get("format") not in ("parquet", "arrow"):
            raise ValueError("the parquet output format writes a table input's columns back: its input must be "
                             "Parquet files or a datasets folder")
        self.pa = pyarrow()
        self.names = self._names(ctx)
        self.written = [self.names[f] for f, _ in ctx.members]
        self.last = {}  # file -> index of its last kept row
        for i, (f, _) in enumerate(ctx.members):
            self.last[f] = i
        self.pending: dict[int, bytes] = {}

    def write(self, rows: Rows) -> None:
        pngs = encode_pngs(rows.protected, self.ctx.png_level, self.ctx.workers)
        for i in range(rows.a, rows.b):
            self.pending[i] = pngs[i - rows.a]
            f = self.ctx.members[i][0]
            if self.last[f] == i:
                self._file(f)

    def _file(self, f: int) -> None:
        pa, ctx = self.pa, self.ctx
        src, kind = Path(ctx.origin["files"][f]), ctx.origin["format"]
        column = ctx.origin["image_key"]
        kept = {r: i for i, (ff, r) in enumerate(ctx.members) if ff == f}
        tmp = ctx.output_dir / f".{self.names[f]}.tmp"
        writer, start = None, 0
        try:
            for b in batches(src, kind):
                if writer is None:
                    writer = pa.parquet.ParquetWriter(tmp, b.schema)
                take = [r - start for r in range(start, start + b.num_rows) if r in kept]
                images = [self.pending.pop(kept[start + t]) for t in take]
                start += b.num_rows
                if not take:
                    continue
                b = b.take(pa.array(take, pa.int64()))
                k = b.schema.get_field_index(column)
                field = b.schema.field(k)
                if pa.types.is_struct(field.type):
                    paths = b.column(k).field("path").to_pylist() if field.type.get_field_index("path") >= 0 else None
                    cells = [{"bytes": img, **({"path": None if p is None else str(PurePosixPath(p).with_suffix(".png"))}
                                               if paths is not None else {})} for img, p in zip(images, paths or images)]
                    new = pa.array(cells, type=field.type)
                else:
                    new = pa.array(images, type=field.type)
                writer.write_batch(b.set_column(k, field, new))
        finally:
            if writer is not None:
                writer.close()
        os.replace(tmp, ctx.output_dir / self.names[f])

    def close(self) -> dict:
        n = len(set(self.written))
        return {self.name: {"written": True, "why": f"{n} Parquet file(s), every column and the schema kept, each "
                            "image as lossless PNG bytes"}}
