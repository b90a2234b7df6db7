"""WebDataset shards out (``--output-format webdataset``): one output shard per input shard,
with its name, its samples in order and their keys; every member of a sample passed through
byte for byte except the image, which becomes ``<key>.png`` (lossless: a JPEG would strip
the perturbation, being itself a defence). Each shard is written under a hidden temporary
name and renamed when complete. Members carry mtime 0, mode 0444 and no owner, so a rerun
writes the same bytes. Needs a WebDataset input (its members are what passes through)."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

from ..png import encode_pngs
from ..wds import read_member
from .base import Rows, Sink, SinkContext


def _shard_names(ctx: SinkContext) -> list[str]:
    shards = [Path(s) for s in (ctx.origin or {}).get("shards", [])]
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("two input shards share a file name, so their outputs would too: "
                         f"{sorted(n for n in names if names.count(n) > 1)[0]!r}")
    return names


class WebDatasetShards(Sink):
    name = "webdataset"

    def planned(self, ctx: SinkContext) -> list[str]:
        if ctx.members is None:
            return []
        names = _shard_names(ctx)
        return [names[i] for i in np.unique(ctx.members.shard).tolist()]

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        if ctx.members is None:
            raise ValueError("the webdataset output format passes a WebDataset input's members through: its input "
                             "must be WebDataset shards")
        self.shards = [Path(s) for s in ctx.origin["shards"]]
        self.names = _shard_names(ctx)
        self.written = [self.names[i] for i in ctx.members.shard.tolist()]
        self.current, self.tar, self.tmp = None, None, None

    def _start(self, shard: int) -> None:
        self._finish()
        self.current = shard
        self.tmp = self.ctx.output_dir / f".{self.names[shard]}.tmp"
        self.tar = tarfile.open(self.tmp, mode="w", format=tarfile.USTAR_FORMAT)

    def _finish(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.tmp, self.ctx.output_dir / self.names[self.current])
            self.tar = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, rows: Rows) -> None:
        pngs = encode_pngs(rows.protected, self.ctx.png_level, self.ctx.workers)
        for i in range(rows.a, rows.b):
            m = self.ctx.members[i]
            if m["shard"] != self.current:
                self._start(m["shard"])
            for ext, where in m["members"].items():
                if ext == m["image"]:
                    self._add(f"{m['key']}.png", pngs[i - rows.a])
                else:
                    self._add(f"{m['key']}.{ext}", read_member(self.shards[m["shard"]], tuple(where)))

    def close(self) -> dict:
        self._finish()
        n = len(set(self.written))
        return {self.name: {"written": True, "why": f"{n} WebDataset shard(s), the input's names, keys and non-image "
                            "members, each image as a lossless <key>.png"}}
