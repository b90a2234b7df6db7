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

from ..decode import display_path
from ..wds import image_ext, is_shard_spec, label_of, list_shards, read_member, scan_shard
from ._stream import (IMAGES_FILE, AlphaDroppedWarning, StreamedSource, classes_of, decode_stream, settle,
                      skip_or_raise)

__all__ = ["AlphaDroppedWarning", "WebDataset"]


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
        samples, skipped, labels, exts = [], [], [], []
        for i, shard in enumerate(shards):
            for s in scan_shard(shard, i):
                try:
                    ext = image_ext(s, shard, self.image_key)
                    label = label_of(s, shard, self.label_key)
                except ValueError as e:
                    skip_or_raise(skip_bad, skipped, f"{display_path(shard)}:{s.key}", str(e))
                    continue
                samples.append(s)
                labels.append(label)
                exts.append(ext)
        if not samples:
            raise ValueError(f"no samples with an image and a label in {source}")

        def where(r):
            return f"sample {samples[r].key!r} of shard {display_path(shards[samples[r].shard])}"

        classes, labels = classes_of(labels, where)
        items = ((r, read_member(shards[s.shard], s.members[e])) for r, (s, e) in enumerate(zip(samples, exts)))
        shape, bad = decode_stream(items, len(samples), work / IMAGES_FILE, size, workers, progress, source)
        keep = settle(bad, shape, work / IMAGES_FILE, skip_bad, skipped, where, "image member",
                      lambda r: f"{display_path(shards[samples[r].shard])}:{samples[r].key}")
        return {"shape": [len(keep), *shape[1:]], "classes": classes, "labels": [labels[r] for r in keep],
                "paths": [f"{samples[r].key}.{exts[r]}" for r in keep], "skipped": skipped,
                "origin": {"format": "webdataset", "order": "shards", "shards": [str(s) for s in shards],
                           "image_key": self.image_key, "label_key": self.label_key},
                "members": [{"shard": samples[r].shard, "key": samples[r].key, "image": exts[r],
                             "members": samples[r].members} for r in keep]}
