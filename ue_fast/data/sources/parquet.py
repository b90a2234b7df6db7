"""Parquet files and ``datasets.save_to_disk`` folders (see :mod:`ue_fast.data.tables`), read
in their own order (file order, then row order) with pyarrow. The image comes from the
column ``image_key`` (default: the first of image, img, png, jpg, jpeg, webp), as bytes or
the ``datasets`` Image struct; the label from ``label_key`` (default: the first of label,
labels, fine_label, cls, class, target). Labels are read first (one column, cheap); then
the images are decoded batch by batch, in parallel, into the run's work folder
(``images.npy``, out of core), which a resumed run reuses when no file changed."""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..decode import _check_resize, display_path
from ..exports import write_json_atomic
from ..folders import ImageSet
from ..ingest import _compact, _map, default_workers
from ..tables import batches, hf_features, image_bytes, is_table_spec, list_tables, pick_columns, schema_of
from ._stream import bad_reason, decode_stream
from .base import Source

INDEX_FILE, IMAGES_FILE = "table.json", "images.npy"
VERSION = 1
CHUNK = 64


class Parquet(Source):
    name = "parquet"

    def __init__(self, image_key: str | None = None, label_key: str | None = None):
        self.image_key, self.label_key = image_key, label_key

    def with_keys(self, image_key=None, label_key=None) -> "Parquet":
        return Parquet(image_key, label_key)

    def matches(self, source) -> bool:
        return is_table_spec(source)

    def check(self, source, *, order=None, split: str = "train", resize=None) -> None:
        if order is not None:
            raise ValueError(f"order applies to an image-folder source; {source} is a table, read in its own row "
                             "order")
        if split != "train":
            raise ValueError(f"split {split!r} applies to a CIFAR or SVHN distribution; {source} is read whole")

    def check_input(self, source, *, order=None, main: bool = True) -> None:
        files, kind = list_tables(source)
        pick_columns(schema_of(files[0], kind), self.image_key, self.label_key, display_path(files[0]))

    def read(self, source, *, resize=None, skip_bad: bool = False, progress: bool = False, **_):
        with tempfile.TemporaryDirectory() as work:
            data = self.ingest(source, Path(work), resize=resize, skip_bad=skip_bad, progress=progress, workers=1)
            data.images = torch.from_numpy(np.array(data.images.numpy()))
            data.file = None
            return data

    def ingest(self, source, work, *, resize=None, skip_bad: bool = False, workers=None, progress: bool = True,
               stats=None, main: bool = True, barrier=None, **_):
        work = Path(work)
        if not main:
            barrier()
            return self._load(work, source)
        data = self._ingest(source, work, resize, skip_bad, workers or default_workers(), progress, stats)
        if barrier is not None:
            barrier()
        return data

    def _origin(self, source, files, kind, image, label, features) -> dict:
        return {"format": "parquet" if kind == "parquet" else "arrow", "order": "rows", "path": str(source),
                "files": [str(f) for f in files], "image_key": image, "label_key": label,
                "features": features or None}

    def _load(self, work: Path, source) -> ImageSet:
        meta = json.loads((work / INDEX_FILE).read_text())
        if list(np.load(work / IMAGES_FILE, mmap_mode="r").shape) != meta["shape"]:
            raise ValueError(f"{display_path(work / IMAGES_FILE)} does not match its index: ingest anew")
        data = ImageSet(_map(work / IMAGES_FILE), torch.tensor(meta["labels"], dtype=torch.int64), meta["classes"],
                        meta["paths"], meta["skipped"], file=work / IMAGES_FILE, origin=meta["origin"])
        data.members = meta["rows"]  # for the parquet sink: which row of which file each image is
        return data

    def _labels(self, files, kind, label, where_of):
        values, rows = [], []
        for i, f in enumerate(files):
            r = 0
            for b in batches(f, kind, [label]):
                for v in b.column(0).to_pylist():
                    values.append(v)
                    rows.append((i, r))
                    r += 1
        return values, rows

    def _ingest(self, source, work: Path, resize, skip_bad: bool, workers: int, progress: bool, stats) -> ImageSet:
        t0 = time.perf_counter()
        size = _check_resize(resize)
        files, kind = list_tables(source)
        schema = schema_of(files[0], kind)
        image, label = pick_columns(schema, self.image_key, self.label_key, display_path(files[0]))
        features = hf_features(files[0], schema, kind, source)
        h = hashlib.sha256(json.dumps([VERSION, image, label, size]).encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        signature = h.hexdigest()
        try:
            if json.loads((work / INDEX_FILE).read_text())["signature"] == signature:
                data = self._load(work, source)
                if stats is not None:
                    stats.update(images=len(data), seconds=time.perf_counter() - t0, images_per_s=None, workers=0,
                                 reused=True)
                return data
        except (OSError, ValueError, KeyError):
            pass
        for f in files[1:]:
            if schema_of(f, kind).names != schema.names:
                raise ValueError(f"{display_path(f)} has other columns than {display_path(files[0])}")

        def where(i, r):
            return f"row {r} of {display_path(files[i])}"

        values, rows = self._labels(files, kind, label, where)
        names = (features.get(label) or {}).get("names")
        classes, labels, skipped, keep = _classes(values, rows, names, where, skip_bad)
        if not keep:
            raise ValueError(f"no rows with a label in {source}")
        n = len(keep)
        position = {rows[k]: j for j, k in enumerate(keep)}
        work.mkdir(parents=True, exist_ok=True)
        (work / INDEX_FILE).unlink(missing_ok=True)
        path = work / IMAGES_FILE
        base = Path(source) if Path(source).is_dir() else files[0].parent

        def cells():
            for i, f in enumerate(files):
                r = 0
                for b in batches(f, kind, [image]):
                    for v in b.column(0).to_pylist():
                        j = position.get((i, r))
                        if j is not None:
                            yield j, image_bytes(v, base)
                        r += 1

        used = workers
        shape, bad = decode_stream(cells(), n, path, size, workers, progress)
        if shape is None:
            raise ValueError(f"no image in {source} decodes (column {image!r})")
        for j, err in sorted(bad.items()):
            i, r = rows[keep[j]]
            why = bad_reason(err, shape, repr(image))
            if not skip_bad or err[0] == "size":
                raise ValueError(f"{where(i, r)}: {why}" + ("" if err[0] == "size" else
                                                           " (pass skip_bad=True / --skip-bad to skip it)"))
            skipped.append({"path": f"{display_path(files[i])}:{r}", "reason": why})
        kept = [j for j in range(n) if j not in bad]
        if bad:
            _compact(path, kept, shape)
        meta = {"signature": signature, "shape": [len(kept), *shape[1:]], "classes": classes,
                "labels": [labels[j] for j in kept],
                "paths": [f"{Path(files[rows[keep[j]][0]].name).stem}/{rows[keep[j]][1]:08d}.png" for j in kept],
                "skipped": skipped, "rows": [list(rows[keep[j]]) for j in kept],
                "origin": self._origin(source, files, kind, image, label, features)}
        write_json_atomic(work / INDEX_FILE, meta)
        if stats is not None:
            seconds = time.perf_counter() - t0
            stats.update(images=len(kept), seconds=seconds, images_per_s=len(kept) / max(seconds, 1e-9), workers=used,
                         reused=False)
        return self._load(work, source)


def _classes(values, rows, names, where, skip_bad):
    """(classes, labels per kept row, skipped, indices of the kept rows) from the label column."""
    skipped, keep, kinds = [], [], set()
    for k, v in enumerate(values):
        if v is None or isinstance(v, bool) or not isinstance(v, (int, str)):
            msg = f"{where(*rows[k])} has no usable label ({v!r})"
            if not skip_bad:
                raise ValueError(f"{msg} (pass skip_bad=True / --skip-bad to skip it)")
            skipped.append({"path": where(*rows[k]), "reason": msg})
            continue
        kinds.add(type(v))
        keep.append(k)
    if kinds == {str}:
        classes = sorted({values[k] for k in keep})
        index = {c: i for i, c in enumerate(classes)}
        return classes, [index[values[k]] for k in keep], skipped, keep
    if len(kinds) > 1:
        raise ValueError("the labels mix integers and class names; use one kind")
    ints = [values[k] for k in keep]
    for k in keep:
        if values[k] < 0 or (names is not None and values[k] >= len(names)):
            raise ValueError(f"{where(*rows[k])}: label {values[k]} is outside the class list"
                             + (f" ({len(names)} names)" if names is not None else ""))
    classes = list(names) if names is not None else [str(i) for i in range(max(ints) + 1 if ints else 0)]
    return classes, ints, skipped, keep
