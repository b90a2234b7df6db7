"""Ingest an image folder once, in parallel, into a uint8 ``.npy`` on disk.

``ingest_folder(root, work_dir)`` decodes ``root/<class>/<files>`` exactly as
:func:`~ue_fast.data.folders.read_image_folder` does (same order, RGB conversion,
EXIF orientation, ``resize``, ``skip_bad``, the same errors) but with several worker
processes writing rows straight into ``work_dir/images.npy`` [N, 3, H, W], so the
set never has to fit in memory. ``work_dir/images.json`` (labels, classes, paths,
skipped files and a signature of the listing: every path, size and modification
time, and ``resize``) is written last, atomically: it marks a complete ingest, and a
later call on the same unchanged folder (``--resume``) reuses the array instead of
decoding again.

The returned :class:`ImageSet` has ``file`` set to the array and ``images`` a
read-only memory map of it (touch it by chunks: every page read stays resident
while mapped).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from ..progress import progress as _progress
from .exports import write_json_atomic
from .folders import ImageSet, _check_resize, _decode_error, _load_rgb, folder_origin, ordered_listing

IMAGES_FILE, INDEX_FILE = "images.npy", "images.json"
CHUNK = 64  # images per task: large enough to amortise the inter-process call


def default_workers() -> int:
    """Decoding processes: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def _signature(root: Path, rels: list[str], size) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(size).encode())
    for rel in rels:
        st = os.stat(root / rel)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode_rows(root: str, path: str, offset: int, hw, size, tasks) -> list:
    """In a worker: decode ``tasks`` [(row, rel)] into rows of the .npy at ``path``. Returns
    per task (row, rel, None) on success or (row, rel, (kind, message))."""
    row_bytes = 3 * hw[0] * hw[1]
    out = []
    fd = os.open(path, os.O_WRONLY)
    try:
        for row, rel in tasks:
            try:
                arr = _load_rgb(Path(root) / rel, size)
            except MemoryError:
                raise
            except Exception as e:  # any decoder failure means "unreadable file"
                out.append((row, rel, ("bad", _decode_error(e))))
                continue
            if arr.shape[:2] != tuple(hw):
                out.append((row, rel, ("size", tuple(arr.shape[:2]))))
                continue
            data = np.ascontiguousarray(arr.transpose(2, 0, 1)).tobytes()
            done = 0
            while done < row_bytes:
                done += os.pwrite(fd, data[done:], offset + row * row_bytes + done)
            out.append((row, rel, None))
    finally:
        os.close(fd)
    return out


def _load_index(work_dir: Path, signature: str):
    index, images = work_dir / INDEX_FILE, work_dir / IMAGES_FILE
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("signature") != signature or not images.exists():
        return None
    return meta


def _image_set(work_dir: Path, meta: dict, origin: dict) -> ImageSet:
    arr = np.load(work_dir / IMAGES_FILE, mmap_mode="r")
    if list(arr.shape) != meta["shape"] or arr.dtype != np.uint8:
        raise ValueError(f"{work_dir / IMAGES_FILE} does not match {work_dir / INDEX_FILE}: ingest anew")
    import warnings

    with warnings.catch_warnings():  # read-only map: the library never writes it
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(arr)
    return ImageSet(images, torch.tensor(meta["labels"], dtype=torch.int64), meta["classes"], meta["paths"],
                    meta["skipped"], file=work_dir / IMAGES_FILE, origin=origin)


def ingest_folder(root, work_dir, *, resize=None, skip_bad: bool = False, workers: int | None = None,
                  progress: bool = True, stats: dict | None = None, order=None) -> ImageSet:
    """Decode ``root`` into ``work_dir/images.npy`` (or reuse a complete earlier ingest of the
    same unchanged folder) and return its :class:`ImageSet` (see the module docstring).

    ``order``: an order file (or list) of the folder's relative paths, the data set's own
    order (see :func:`~ue_fast.data.folders.ordered_listing`); default: classes sorted, then
    paths. ``workers``: decoding processes (default :func:`default_workers`; 1 decodes in this
    process). ``stats``, if given, receives ``images``, ``seconds``, ``images_per_s``,
    ``workers`` and ``reused``. Raises what :func:`read_image_folder` raises.
    """
    size = _check_resize(resize)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    workers = workers or default_workers()
    root, work_dir = Path(root), Path(work_dir)
    t0 = time.perf_counter()
    classes, rels, label_of = ordered_listing(root, order)
    n = len(rels)
    origin = folder_origin(root, order)
    signature = _signature(root, rels, size)
    meta = _load_index(work_dir, signature)
    if meta is not None:
        if stats is not None:
            stats.update(images=len(meta["paths"]), seconds=time.perf_counter() - t0, images_per_s=None,
                         workers=0, reused=True)
        return _image_set(work_dir, meta, origin)

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / INDEX_FILE).unlink(missing_ok=True)
    # The first readable image gives H and W (and the first unreadable ones fail or are skipped here).
    skipped: dict[int, dict] = {}
    first = 0
    while True:
        try:
            hw = _load_rgb(root / rels[first], size).shape[:2]
            break
        except MemoryError:
            raise
        except Exception as e:
            if not skip_bad:
                raise ValueError(f"cannot read image {root / rels[first]}: {_decode_error(e)} "
                                 "(pass skip_bad=True / --skip-bad to skip unreadable files)") from e
            skipped[first] = {"path": rels[first], "reason": _decode_error(e)}
            first += 1
            if first == n:
                raise ValueError(f"no readable images in {root}: all {n} files failed to decode "
                                 f"(first: {skipped[0]['path']}: {skipped[0]['reason']})") from None
    path = work_dir / IMAGES_FILE
    m = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, *hw))
    offset = int(m.offset)
    del m
    tasks = [(i, rels[i]) for i in range(first, n)]
    chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    args = (str(root), str(path), offset, hw, size)
    first_rel = rels[first]

    def take(results):
        for row, rel, err in results:
            if err is None:
                continue
            if err[0] == "size":
                raise ValueError(
                    f"images of different sizes in {root}: {first_rel} is {hw[0]}x{hw[1]} "
                    f"but {rel} is {err[1][0]}x{err[1][1]} (HxW); pass resize=(H, W) (--resize) to resize all")
            if not skip_bad:
                raise ValueError(f"cannot read image {root / rel}: {err[1]} "
                                 "(pass skip_bad=True / --skip-bad to skip unreadable files)")
            skipped[row] = {"path": rel, "reason": err[1]}

    used = 1 if workers == 1 or len(chunks) < 2 else min(workers, len(chunks))
    with _progress(n, "reading images", "img", enabled=progress) as bar:
        bar.update(first)
        if used == 1:
            for c in chunks:
                take(_decode_rows(*args, c))
                bar.update(len(c))
        else:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                              else "spawn")
            with ProcessPoolExecutor(used, mp_context=ctx) as pool:
                pending = {pool.submit(_decode_rows, *args, c): len(c) for c in chunks}
                try:
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            bar.update(pending.pop(f))
                            take(f.result())
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
    keep = [i for i in range(n) if i not in skipped]
    if skipped and order is not None:
        first_bad = skipped[min(skipped)]
        raise ValueError(f"{len(skipped)} image(s) of {root} could not be read (first: {first_bad['path']}: "
                         f"{first_bad['reason']}); with an order file every index must hold its image, so "
                         "none can be skipped: fix or replace them")
    if skipped:
        kept = {label_of[i] for i in keep}
        gone = [c for i, c in enumerate(classes) if i not in kept]
        if gone:
            raise ValueError(f"no readable images left in class folder(s) {', '.join(gone)} of {root}")
        _compact(path, keep, (n, 3, *hw))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    meta = {"signature": signature, "shape": [len(keep), 3, *hw], "classes": classes,
            "paths": [rels[i] for i in keep], "labels": [label_of[i] for i in keep],
            "skipped": [skipped[i] for i in sorted(skipped)], "resize": list(size) if size else None}
    write_json_atomic(work_dir / INDEX_FILE, meta)
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats.update(images=len(keep), seconds=seconds, images_per_s=len(keep) / max(seconds, 1e-9), workers=used,
                     reused=False)
    return _image_set(work_dir, meta, origin)


def _compact(path: Path, keep: list[int], shape) -> None:
    """Drop the rows of skipped images: copy the kept ones to a new array that replaces the old."""
    from ..generation.rowfile import RowFile, chunk_rows

    src = RowFile(path)
    tmp = path.with_name(f".{path.name}.compact.tmp")
    dst = RowFile.create(tmp, (len(keep), *shape[1:]), torch.uint8)
    step = chunk_rows(src.row_bytes)
    for start in range(0, len(keep), step):
        dst.write_range(start, src.read(keep[start:start + step]))
    dst.sync()
    src.close()
    dst.close()
    os.replace(tmp, path)
