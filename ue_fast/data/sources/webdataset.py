"""WebDataset shards (``'shards/train-{000000..000146}.tar'``, a glob, a list file of shard
paths, or one ``.tar``; local files), read in their own order: shard order, then order
within a shard. A sample's image is its first present member of ``IMAGE_KEYS`` (``jpg``,
``jpeg``, ``png``, ``webp``, ...) or ``image_key``; its label the integer in its ``cls``
member, or the field ``label_key`` of its ``json`` member (an integer, or a class name:
the sorted names become the classes). Shards are scanned by their tar headers, then the
images are decoded in parallel into the run's work folder (``images.npy``, out of core),
which a resumed run reuses when no shard changed."""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ...progress import progress as _progress
from ..decode import _check_resize, _decode, _decode_error, display_path
from ..exports import write_json_atomic
from ..folders import ImageSet
from ..ingest import _compact, _map, default_workers
from ..wds import (
    image_ext,
    is_shard_spec,
    label_of,
    list_shards,
    read_member,
    scan_shard,
)
from .base import Source

INDEX_FILE, IMAGES_FILE = "webdataset.json", "images.npy"
CHUNK = 64
VERSION = 1


class AlphaDroppedWarning(UserWarning):
    """Images of a WebDataset input had transparency; the protected PNG members are RGB."""


def _signature(shards, image_key, label_key, size) -> str:
    h = hashlib.sha256(json.dumps([VERSION, image_key, label_key, size]).encode())
    for s in shards:
        st = s.stat()
        h.update(f"{s.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode_rows(images_path: str, offset: int, shape, size, tasks):
    """Decode (row, shard, (offset, size)) tasks into the memory-mapped rows; per task, None or
    the error, and whether it had alpha."""
    m = np.memmap(images_path, dtype=np.uint8, mode="r+", offset=offset, shape=tuple(shape))
    out = []
    for row, shard, where in tasks:
        try:
            d = _decode(io.BytesIO(read_member(Path(shard), tuple(where))), size)
            if d.rgb.shape[:2] != tuple(shape[2:]):
                out.append((row, ("size", d.rgb.shape[:2]), False))
                continue
            m[row] = d.rgb.transpose(2, 0, 1)
            out.append((row, None, d.alpha is not None))
        except MemoryError:
            raise
        except Exception as e:
            out.append((row, ("decode", _decode_error(e)), False))
    m.flush()
    return out


class WebDataset(Source):
    name = "webdataset"

    def __init__(self, image_key: str | None = None, label_key: str | None = None):
        self.image_key, self.label_key = image_key, label_key

    def with_keys(self, image_key=None, label_key=None) -> "WebDataset":
        return WebDataset(image_key, label_key)

    def matches(self, source) -> bool:
        return is_shard_spec(source)

    def check(self, source, *, order=None, split: str = "train", resize=None) -> None:
        if order is not None:
            raise ValueError(f"order applies to an image-folder source; {source} are WebDataset shards, read in "
                             "their own order (shard order, then order within a shard)")
        if split != "train":
            raise ValueError(f"split {split!r} applies to a CIFAR or SVHN distribution; {source} is read whole")

    def check_input(self, source, *, order=None, main: bool = True) -> None:
        list_shards(source)  # every shard exists

    def read(self, source, *, resize=None, skip_bad: bool = False, progress: bool = False, **_):
        with tempfile.TemporaryDirectory() as work:
            data = self.ingest(source, Path(work), resize=resize, skip_bad=skip_bad, progress=progress, workers=1)
            data.images = torch.from_numpy(np.array(data.images.numpy()))  # into memory, off the temporary file
            data.file = None
            return data

    def ingest(self, source, work, *, resize=None, skip_bad: bool = False, workers=None, progress: bool = True,
               stats=None, main: bool = True, barrier=None, **_):
        work = Path(work)
        if not main:  # rank 0 ingests; the others open its array
            barrier()
            return self._load(work, source)
        data = self._ingest(source, work, resize, skip_bad, workers or default_workers(), progress, stats)
        if barrier is not None:
            barrier()
        return data

    # ------------------------------------------------------------------------------------------------
    def _origin(self, shards) -> dict:
        return {"format": "webdataset", "order": "shards", "shards": [str(s) for s in shards],
                "image_key": self.image_key, "label_key": self.label_key}

    def _load(self, work: Path, source) -> ImageSet:
        meta = json.loads((work / INDEX_FILE).read_text())
        arr = np.load(work / IMAGES_FILE, mmap_mode="r")
        if list(arr.shape) != meta["shape"]:
            raise ValueError(f"{display_path(work / IMAGES_FILE)} does not match its index: ingest anew")
        del arr
        data = ImageSet(_map(work / IMAGES_FILE), torch.tensor(meta["labels"], dtype=torch.int64), meta["classes"], meta["paths"],
                        meta["skipped"], file=work / IMAGES_FILE, origin=self._origin(list_shards(source)))
        data.members = meta["samples"]  # for the webdataset sink: every member of every kept sample
        return data

    def _ingest(self, source, work: Path, resize, skip_bad: bool, workers: int, progress: bool, stats) -> ImageSet:
        import time

        t0 = time.perf_counter()
        size = _check_resize(resize)
        shards = list_shards(source)
        signature = _signature(shards, self.image_key, self.label_key, size)
        try:
            if json.loads((work / INDEX_FILE).read_text())["signature"] == signature:
                data = self._load(work, source)
                if stats is not None:
                    stats.update(images=len(data), seconds=time.perf_counter() - t0, images_per_s=None, workers=0,
                                 reused=True)
                return data
        except (OSError, ValueError, KeyError):
            pass
        samples, skipped, labels, exts = [], [], [], []
        for i, shard in enumerate(shards):
            for s in scan_shard(shard, i):
                try:
                    ext = image_ext(s, shard, self.image_key)
                    label = label_of(s, shard, self.label_key)
                except ValueError as e:
                    if not skip_bad:
                        raise ValueError(f"{e} (pass skip_bad=True / --skip-bad to skip it)") from None
                    skipped.append({"path": f"{display_path(shard)}:{s.key}", "reason": str(e)})
                    continue
                samples.append(s)
                labels.append(label)
                exts.append(ext)
        if not samples:
            raise ValueError(f"no samples with an image and a label in {source}")
        classes, labels = _classes(labels, shards, samples)
        n, hw = len(samples), None
        for s, e in zip(samples, exts):  # the first image that decodes gives H and W (the others fail below)
            try:
                hw = _decode(io.BytesIO(read_member(shards[s.shard], s.members[e])), size).rgb.shape[:2]
                break
            except Exception:
                continue
        if hw is None:
            raise ValueError(f"no image of {source} decodes")
        work.mkdir(parents=True, exist_ok=True)
        (work / INDEX_FILE).unlink(missing_ok=True)
        path = work / IMAGES_FILE
        m = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, *hw))
        offset = int(m.offset)
        del m
        tasks = [(r, str(shards[s.shard]), s.members[e]) for r, (s, e) in enumerate(zip(samples, exts))]
        chunks = [tasks[i:i + CHUNK] for i in range(0, n, CHUNK)]
        args = (str(path), offset, (n, 3, *hw), size)
        bad, alpha = {}, 0
        used = 1 if workers == 1 or len(chunks) < 2 else min(workers, len(chunks))
        with _progress(n, "reading images", "img", enabled=progress) as bar:
            if used == 1:
                results = (_decode_rows(*args, c) for c in chunks)
                pool = None
            else:
                ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else "spawn")
                pool = ProcessPoolExecutor(used, mp_context=ctx)
                results = pool.map(_decode_rows, *zip(*[(*args, c) for c in chunks]))
            try:
                for res in results:
                    for row, err, had_alpha in res:
                        alpha += had_alpha
                        if err is not None:
                            bad[row] = err
                    bar.update(len(res))
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        for row, err in sorted(bad.items()):
            s = samples[row]
            where = f"sample {s.key!r} of shard {display_path(shards[s.shard])}"
            why = (f"{err[1][0]}x{err[1][1]} pixels where the first image is {hw[0]}x{hw[1]} (pass resize=(H, W) / "
                   "--resize to resize all)") if err[0] == "size" else f"cannot decode its .{exts[row]}: {err[1]}"
            if not skip_bad or err[0] == "size":
                raise ValueError(f"{where}: {why}" + ("" if err[0] == "size" else
                                                       " (pass skip_bad=True / --skip-bad to skip it)"))
            skipped.append({"path": f"{display_path(shards[s.shard])}:{s.key}", "reason": why})
        keep = [r for r in range(n) if r not in bad]
        if bad:
            _compact(path, keep, (n, 3, *hw))
        if alpha:
            warnings.warn(f"{alpha} image(s) of {source} have transparency: the protected images are RGB, their "
                          "alpha is not kept", AlphaDroppedWarning, stacklevel=3)
        meta = {"signature": signature, "shape": [len(keep), 3, *hw], "classes": classes,
                "labels": [labels[r] for r in keep], "paths": [f"{samples[r].key}.{exts[r]}" for r in keep],
                "skipped": skipped,
                "samples": [{"shard": samples[r].shard, "key": samples[r].key, "image": exts[r],
                             "members": samples[r].members} for r in keep]}
        write_json_atomic(work / INDEX_FILE, meta)
        if stats is not None:
            seconds = time.perf_counter() - t0
            stats.update(images=len(keep), seconds=seconds, images_per_s=len(keep) / max(seconds, 1e-9), workers=used,
                         reused=False)
        return self._load(work, source)


def _classes(labels: list, shards, samples) -> tuple[list[str], list[int]]:
    """Integer labels: classes "0".."max"; class names: the sorted names. A mix, or a negative
    integer, is an error naming the sample."""
    names = {type(x) for x in labels}
    if names == {int}:
        for x, s in zip(labels, samples):
            if x < 0:
                raise ValueError(f"sample {s.key!r} of shard {display_path(shards[s.shard])}: label {x} is below 0")
        return [str(i) for i in range(max(labels) + 1)], labels
    if names == {str}:
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
        return classes, [index[x] for x in labels]
    raise ValueError("the labels mix integers and class names; use one kind")
