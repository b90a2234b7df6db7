"""What the sources read record by record share (WebDataset shards, tables, LMDB): ingest into
the run's work folder (``images.npy``, out of core) with an index that a resumed run reuses
while the input is unchanged, the parallel decoding of a stream of encoded images, the
handling of the rows that fail, and the classes of their labels."""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ...progress import progress as _progress
from ..decode import _check_resize, _decode, _decode_error, display_path
from ..exports import write_json_atomic
from ..folders import ImageSet
from ..ingest import _compact, _map, default_workers
from .base import Source

IMAGES_FILE = "images.npy"
CHUNK = 64
SKIP_HINT = " (pass skip_bad=True / --skip-bad to skip it)"


class AlphaDroppedWarning(UserWarning):
    """Images of a streamed input had transparency; the protected images are RGB."""


class StreamedSource(Source):
    """A source read record by record. A subclass names its ``index_file`` and ``own_order`` (how
    it orders its records, for the refusal of an order file) and implements ``files`` (what the
    reuse signature covers), ``keys`` (what else it covers) and ``build`` (the index: shape,
    classes, labels, paths, skipped, origin, members, after decoding into ``images.npy``)."""

    index_file: ClassVar[str]
    own_order: ClassVar[str]
    keyed: ClassVar[bool] = True  # image_key and label_key apply (--image-key, --label-key)

    def __init__(self, image_key: str | None = None, label_key: str | None = None):
        self.image_key, self.label_key = image_key, label_key

    def with_keys(self, image_key=None, label_key=None) -> "StreamedSource":
        return type(self)(image_key, label_key)

    def check(self, source, *, order=None, split: str = "train", resize=None) -> None:
        if order is not None:
            raise ValueError(f"order applies to an image-folder source; {source} {self.own_order}")
        if split != "train":
            raise ValueError(f"split {split!r} applies to a CIFAR or SVHN distribution; {source} is read whole")

    def read(self, source, *, resize=None, skip_bad: bool = False, progress: bool = False, **_):
        with tempfile.TemporaryDirectory() as work:
            data = self.ingest(source, Path(work), resize=resize, skip_bad=skip_bad, progress=progress, workers=1)
            data.images = torch.from_numpy(np.array(data.images.numpy()))  # into memory, off the temporary file
            data.file = None
            return data

    def ingest(self, source, work, *, resize=None, skip_bad: bool = False, workers=None, progress: bool = True,
               stats=None, main: bool = True, barrier=None, **_):
        work = Path(work)
        if not main:  # rank 0 ingests; the others open what it wrote
            barrier()
            return self._load(work)
        data = self._ingest(source, work, resize, skip_bad, workers or default_workers(), progress, stats)
        if barrier is not None:
            barrier()
        return data

    def files(self, source) -> list[Path]:
        raise NotImplementedError

    def keys(self) -> list:
        return [self.image_key, self.label_key]

    def build(self, source, work: Path, size, skip_bad: bool, workers: int, progress: bool) -> dict:
        raise NotImplementedError

    def _load(self, work: Path) -> ImageSet:
        meta = json.loads((work / self.index_file).read_text())
        if list(np.load(work / IMAGES_FILE, mmap_mode="r").shape) != meta["shape"]:
            raise ValueError(f"{display_path(work / IMAGES_FILE)} does not match its index: ingest anew")
        data = ImageSet(_map(work / IMAGES_FILE), torch.tensor(meta["labels"], dtype=torch.int64), meta["classes"],
                        meta["paths"], meta["skipped"], file=work / IMAGES_FILE, origin=meta["origin"])
        data.members = self.members(work, meta)  # what a sink that writes the input's format back passes through
        return data

    def members(self, work: Path, meta: dict):
        """Per row, where its record lies in the input (what a sink writing the input's format
        back passes through), or None."""
        return meta.get("members")

    def _ingest(self, source, work: Path, resize, skip_bad: bool, workers: int, progress: bool, stats) -> ImageSet:
        t0 = time.perf_counter()
        size = _check_resize(resize)
        h = hashlib.sha256(json.dumps([type(self).__name__, *self.keys(), size]).encode())
        for f in self.files(source):
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        signature = h.hexdigest()
        try:
            if json.loads((work / self.index_file).read_text())["signature"] == signature:
                data = self._load(work)
                if stats is not None:
                    stats.update(images=len(data), seconds=time.perf_counter() - t0, images_per_s=None, workers=0,
                                 reused=True)
                return data
        except (OSError, ValueError, KeyError):
            pass
        work.mkdir(parents=True, exist_ok=True)
        (work / self.index_file).unlink(missing_ok=True)
        meta = self.build(source, work, size, skip_bad, workers, progress)
        write_json_atomic(work / self.index_file, {"signature": signature, **meta})
        if stats is not None:
            seconds, n = time.perf_counter() - t0, meta["shape"][0]
            stats.update(images=n, seconds=seconds, images_per_s=n / max(seconds, 1e-9), workers=workers,
                         reused=False)
        return self._load(work)


def _decode_into(images_path: str, offset: int, shape, size, tasks):
    m = np.memmap(images_path, dtype=np.uint8, mode="r+", offset=offset, shape=tuple(shape))
    out = []
    for row, data in tasks:
        try:
            d = _decode(io.BytesIO(data), size)
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


def decode_stream(items, n: int, path: Path, size, workers: int, progress: bool, source) -> tuple[tuple, dict]:
    """``items``: (row, encoded bytes or None) for rows 0..n-1, in any order. Writes ``path``
    [n, 3, H, W] uint8, H and W from the first image that decodes (or ``size``); warns
    (:class:`AlphaDroppedWarning`) when images had transparency. Returns (shape, {row: (kind,
    detail)} of the rows that failed: "none" (no bytes), "decode" (the error), "size" (its H, W));
    a ValueError when no image of ``source`` decodes."""
    bad: dict[int, tuple] = {}
    shape, offset, batch, pending, alpha = None, 0, [], [], 0
    pool = None
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx)

    def collect(keep: int, bar):
        nonlocal alpha
        while len(pending) > keep:
            res = pending.pop(0)
            res = res.result() if hasattr(res, "result") else res
            for row, err, had_alpha in res:
                alpha += had_alpha
                if err is not None:
                    bad[row] = err
            bar.update(len(res))

    def submit(bar):
        args = (str(path), offset, shape, size, list(batch))
        pending.append(_decode_into(*args) if pool is None else pool.submit(_decode_into, *args))
        batch.clear()
        collect(2 * workers, bar)

    try:
        with _progress(n, "reading images", "img", enabled=progress) as bar:
            for row, data in items:
                if data is None:
                    bad[row] = ("none", "no image bytes")
                    bar.update(1)
                    continue
                if shape is None:  # the first image that decodes gives H and W
                    try:
                        hw = _decode(io.BytesIO(data), size).rgb.shape[:2]
                    except Exception as e:
                        bad[row] = ("decode", _decode_error(e))
                        bar.update(1)
                        continue
                    shape = (n, 3, *hw)
                    m = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
                    offset = int(m.offset)
                    del m
                batch.append((row, data))
                if len(batch) == CHUNK:
                    submit(bar)
            if batch and shape is not None:
                submit(bar)
            collect(0, bar)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if shape is None:
        raise ValueError(f"no image of {source} decodes")
    if alpha:
        warnings.warn(f"{alpha} image(s) of {source} have transparency: the protected images are RGB, their "
                      "alpha is not kept", AlphaDroppedWarning, stacklevel=4)
    return shape, bad


def skip_or_raise(skip_bad: bool, skipped: list, path: str, why: str) -> None:
    """A bad sample: a ValueError saying ``why`` (with how to skip it), or with ``skip_bad`` its
    ``path`` and ``why`` added to ``skipped`` (the manifest's list)."""
    if not skip_bad:
        raise ValueError(why + SKIP_HINT)
    skipped.append({"path": path, "reason": why})


def settle(bad: dict, shape, path: Path, skip_bad: bool, skipped: list, where, what: str, name) -> list[int]:
    """The rows ``decode_stream`` could not read: an error naming the first (``where(row)``: where
    it is; ``what``: its image member or column), or with ``skip_bad`` each added to ``skipped``
    (as ``name(row)``) and left out of ``path``; a size mismatch always stops. Returns the rows kept."""
    for row, err in sorted(bad.items()):
        if err[0] == "size":
            why = (f"{err[1][0]}x{err[1][1]} pixels where the first image is {shape[2]}x{shape[3]} (pass "
                   "resize=(H, W) / --resize to resize all)")
        elif err[0] == "none":
            why = f"no image bytes in its {what}"
        else:
            why = f"cannot decode its {what}: {err[1]}"
        if err[0] == "size":
            raise ValueError(f"{where(row)}: {why}")
        if not skip_bad:
            raise ValueError(f"{where(row)}: {why}{SKIP_HINT}")
        skipped.append({"path": name(row), "reason": why})
    kept = [r for r in range(shape[0]) if r not in bad]
    if bad:
        _compact(path, kept, shape)
    return kept


def classes_of(values: list, where, names=None) -> tuple[list[str], list[int]]:
    """The classes and integer labels of usable label values (ints or class names): class names
    sorted; integers numbering ``names`` if given, else the classes "0".."max". A mix, a negative
    integer or one outside ``names`` is an error naming the record (``where(index)``)."""
    kinds = {type(v) for v in values}
    if kinds == {str}:
        classes = sorted(set(values))
        index = {c: i for i, c in enumerate(classes)}
        return classes, [index[v] for v in values]
    if len(kinds) > 1:
        raise ValueError("the labels mix integers and class names; use one kind")
    for k, v in enumerate(values):
        if v < 0 or (names is not None and v >= len(names)):
            raise ValueError(f"{where(k)}: label {v} is "
                             + ("below 0" if v < 0 else f"outside the class list ({len(names)} names)"))
    return (list(names) if names is not None else [str(i) for i in range(max(values) + 1)]), list(values)
