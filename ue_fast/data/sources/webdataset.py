"""WebDataset shards (``'shards/train-{000000..000146}.tar'``, a glob, a list file of shard
paths, or one ``.tar``; local files), read in their own order: shard order, then order
within a shard. A sample's image is its first present member of ``IMAGE_KEYS`` (``jpg``,
``jpeg``, ``png``, ``webp``, ...) or ``image_key``; its label the integer in its ``cls``
member, or the field ``label_key`` of its ``json`` member (an integer, or a class name:
the sorted names become the classes). Shards are scanned by their tar headers, then the
images are decoded in parallel into the run's work folder (``images.npy``, out of core),
which a resumed run reuses when no shard changed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..decode import display_path
from ..exports import atomic_open
from ..wds import SampleIndex, SampleRows, image_ext, is_shard_spec, label_of, list_shards, read_member, scan_shard
from ._stream import (IMAGES_FILE, AlphaDroppedWarning, StreamedSource, classes_of, decode_stream, settle,
                      skip_or_raise)

__all__ = ["AlphaDroppedWarning", "WebDataset"]

MEMBERS_FILE = "webdataset_members.npy"  # the work folder's SampleIndex table, beside webdataset.json


def atomic_save_npy(path: Path, a: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.save(f, a, allow_pickle=False)


class WebDataset(StreamedSource):
    name = "webdataset"
    index_file = "webdataset.json"
    own_order = "are WebDataset shards, read in their own order (shard order, then order within a shard)"

    def matches(self, source) -> bool:
        return is_shard_spec(source)

    def check_input(self, source, *, order=None, main: bool = True) -> None:
        list_shards(source)  # every shard exists

    def files(self, source) -> list[Path]:
        return list_shards(source)

    def build(self, source, work: Path, size, skip_bad: bool, workers: int, progress: bool) -> dict:
        shards = list_shards(source)
        rows, keys, skipped, labels = SampleRows(), [], [], []
        for i, shard in enumerate(shards):
            for s in scan_shard(shard, i):  # one shard's samples as objects at a time
                try:
                    ext = image_ext(s, shard, self.image_key)
                    label = label_of(s, shard, self.label_key)
                except ValueError as e:
                    skip_or_raise(skip_bad, skipped, f"{display_path(shard)}:{s.key}", str(e))
                    continue
                rows.add(s, ext)
                keys.append(s.key)
                labels.append(label)
        if not rows.n:
            raise ValueError(f"no samples with an image and a label in {source}")

        def where(r):
            return f"sample {keys[r]!r} of shard {display_path(shards[rows.shard[r]])}"

        def image(r):
            shard, at = rows.image_member(r)
            return read_member(shards[shard], at)

        classes, labels = classes_of(labels, where)
        shape, bad = decode_stream(((r, image(r)) for r in range(rows.n)), rows.n, work / IMAGES_FILE, size, workers,
                                   progress, source)
        keep = settle(bad, shape, work / IMAGES_FILE, skip_bad, skipped, where, "image member",
                      lambda r: f"{display_path(shards[rows.shard[r]])}:{keys[r]}")
        atomic_save_npy(work / MEMBERS_FILE, rows.table(keep))
        return {"shape": [len(keep), *shape[1:]], "classes": classes, "labels": [labels[r] for r in keep],
                "paths": [f"{keys[r]}.{rows.exts[rows.image[r]]}" for r in keep], "skipped": skipped,
                "origin": {"format": "webdataset", "order": "shards", "shards": [str(s) for s in shards],
                           "image_key": self.image_key, "label_key": self.label_key},
                "member_exts": rows.exts}

    def members(self, work: Path, meta: dict) -> SampleIndex:
        return SampleIndex(np.load(work / MEMBERS_FILE, mmap_mode="r"), meta["member_exts"], meta["paths"])
