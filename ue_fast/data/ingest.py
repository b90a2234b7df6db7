"""Ingest an image folder once, in parallel, into a uint8 ``.npy`` on disk.

``ingest_folder(root, work_dir)`` decodes ``root/<class>/<files>`` exactly as
:func:`~ue_fast.data.folders.read_image_folder` does (same order, RGB conversion,
alpha kept apart, EXIF orientation, ``resize``, ``skip_bad``, the same errors) but
with several worker processes writing rows straight into ``work_dir/images.npy``
[N, 3, H, W], so the set never has to fit in memory. An image with an alpha channel
(anything below 255) has it written by its worker to the row of ``work_dir/alpha.npy``
[N, H, W]; that file is created by the first such image only, so a set without
transparency costs no extra disk, and at the end the rows of opaque images are
filled with 255 (``ImageSet.alpha`` is then a read-only memory map of it, else None).

``work_dir/images.json`` (labels, classes, paths, skipped files, the ``ignored``
entries, whether ``alpha.npy`` exists, and a signature of the listing: every path,
size and modification time, what was not read, ``resize`` and the decoding's
version) is written last, atomically: it marks a complete ingest, and a later call
on the same unchanged folder (``--resume``) reuses the arrays instead of decoding
again, with the same ``ignored`` and ``skipped``.

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
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from ..progress import progress as _progress
from .decode import _check_resize, _decode, _decode_error, _frames_note, display_path
from .exports import write_json_atomic
from .folders import ImageSet, folder_origin
from .scan import list_image_folder

IMAGES_FILE, INDEX_FILE, ALPHA_FILE = "images.npy", "images.json", "alpha.npy"
CHUNK = 64  # images per task: large enough to amortise the inter-process call
# Part of the signature: an ingest made by an older decoding (alpha composited onto black,
# fewer formats) is not reused.
DECODE_VERSION = 2


def default_workers() -> int:
    """Decoding processes: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def _fs(s: str) -> bytes:
    """A path's bytes (a name that is not valid UTF-8 included)."""
    return s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)


def _signature(root: Path, rels: list[str], size, ignored=()) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{DECODE_VERSION}\0{size!r}\n".encode())
    for rel in rels:
        try:
            st = os.stat(root / rel)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}".encode()
        except OSError as e:  # a dangling link, permission denied: decoding names it
            try:
                st = os.lstat(root / rel)
                stamp = f"unreadable {e.errno} {st.st_mtime_ns}".encode()
            except OSError:
                stamp = f"missing {e.errno}".encode()
        h.update(_fs(rel) + b"\0" + stamp + b"\n")
    for d in ignored:  # a file added next to the images changes what is reported
        h.update(b"ignored\0" + _fs(d["path"]) + b"\0" + _fs(d.get("kind", "")) + b"\n")
    return h.hexdigest()


def _npy_header(shape) -> bytes:
    """The header bytes of a C-ordered uint8 ``.npy`` of ``shape`` (what ``open_memmap`` writes)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _open_alpha(path: str, header: bytes, total: int) -> int:
    """Open (creating it if no worker has yet) the alpha ``.npy``: every worker writes the same
    header and extends it to the same length, so the order they come in does not matter."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    _pwrite_all(fd, header, 0)
    if os.fstat(fd).st_size < total:
        os.ftruncate(fd, total)  # sparse zeros; extending to the same length loses nothing
    return fd


def _decode_rows(root: str, path: str, offset: int, hw, size, alpha_path: str, alpha_header: bytes,
                 alpha_bytes: int, tasks) -> list:
    """In a worker: decode ``tasks`` [(row, rel)] into rows of the .npy at ``path`` (and of the
    alpha .npy, ``alpha_bytes`` bytes in all, for images with alpha). Returns per task
    (row, rel, None, info) on success, info = (has alpha, the ``ignored`` entry of a
    multi-frame file or None), or (row, rel, (kind, message), None)."""
    row_bytes = 3 * hw[0] * hw[1]
    plane = hw[0] * hw[1]
    out = []
    fd = os.open(path, os.O_WRONLY)
    afd = None
    try:
        for row, rel in tasks:
            try:
                d = _decode(Path(root) / rel, size)
            except MemoryError:
                raise
            except Exception as e:  # any decoder failure means "unreadable file"
                out.append((row, rel, ("bad", _decode_error(e)), None))
                continue
            arr = d.rgb
            if arr.shape[:2] != tuple(hw):
                out.append((row, rel, ("size", tuple(arr.shape[:2])), None))
                continue
            _pwrite_all(fd, np.ascontiguousarray(arr.transpose(2, 0, 1)).tobytes(), offset + row * row_bytes)
            if d.alpha is not None:
                if afd is None:
                    afd = _open_alpha(alpha_path, alpha_header, alpha_bytes)
                _pwrite_all(afd, np.ascontiguousarray(d.alpha).tobytes(), len(alpha_header) + row * plane)
            out.append((row, rel, None, (d.alpha is not None, _frames_note(rel, d))))
    finally:
        os.close(fd)
        if afd is not None:
            os.close(afd)
    return out


def _load_index(work_dir: Path, signature: str):
    index, images = work_dir / INDEX_FILE, work_dir / IMAGES_FILE
    try:
        meta = json.loads(index.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("signature") != signature or not images.exists():
        return None
    if "ignored" not in meta or "alpha" not in meta:  # written by an older version
        return None
    if meta["alpha"] and not (work_dir / ALPHA_FILE).exists():
        return None
    return meta


def _map(path: Path) -> torch.Tensor:
    arr = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():  # read-only map: the library never writes it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _image_set(work_dir: Path, meta: dict, origin: dict) -> ImageSet:
    arr = np.load(work_dir / IMAGES_FILE, mmap_mode="r")
    if list(arr.shape) != meta["shape"] or arr.dtype != np.uint8:
        raise ValueError(f"{display_path(work_dir / IMAGES_FILE)} does not match "
                         f"{display_path(work_dir / INDEX_FILE)}: ingest anew")
    del arr
    alpha = None
    if meta["alpha"]:
        a = np.load(work_dir / ALPHA_FILE, mmap_mode="r")
        if [*a.shape] != [meta["shape"][0], *meta["shape"][2:]] or a.dtype != np.uint8:
            raise ValueError(f"{display_path(work_dir / ALPHA_FILE)} does not match "
                             f"{display_path(work_dir / INDEX_FILE)}: ingest anew")
        del a
        alpha = _map(work_dir / ALPHA_FILE)
    return ImageSet(_map(work_dir / IMAGES_FILE), torch.tensor(meta["labels"], dtype=torch.int64), meta["classes"],
                    meta["paths"], meta["skipped"], file=work_dir / IMAGES_FILE, origin=origin,
                    ignored=meta["ignored"], alpha=alpha)


def _cannot_read(root: Path, rel: str, reason: str) -> ValueError:
    return ValueError(f"cannot read image {display_path(root / rel)}: {reason} "
                      "(pass skip_bad=True / --skip-bad to skip unreadable files)")


def _first_readable(root: Path, rels: list[str], size, skip_bad: bool, skipped: dict) -> tuple[int, tuple]:
    """The index and (H, W) of the first readable image; the unreadable ones before it fail, or
    are added to ``skipped`` with ``skip_bad``."""
    n, first = len(rels), 0
    while True:
        try:
            return first, _decode(root / rels[first], size).rgb.shape[:2]
        except MemoryError:
            raise
        except Exception as e:
            if not skip_bad:
                raise _cannot_read(root, rels[first], _decode_error(e)) from e
            skipped[first] = {"path": rels[first], "reason": _decode_error(e)}
            first += 1
            if first == n:
                raise ValueError(f"no readable images in {display_path(root)}: all {n} files failed to decode "
                                 f"(first: {display_path(skipped[0]['path'])}: {skipped[0]['reason']})") from None


def _decode_all(root: Path, rels: list[str], first: int, hw, size, path: Path, offset: int, alpha_path: Path, n: int,
                workers: int, progress: bool, skip_bad: bool, skipped: dict) -> tuple[set, list, int]:
    """Decode rows ``first..n-1`` into the memory-mapped ``path`` by chunks, in ``workers``
    processes; (the rows with alpha, the multi-frame notes, the processes used)."""
    tasks = [(i, rels[i]) for i in range(first, n)]
    chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    alpha_header = _npy_header((n, *hw))
    args = (str(root), str(path), offset, hw, size, str(alpha_path), alpha_header,
            len(alpha_header) + n * hw[0] * hw[1])
    first_rel = rels[first]
    with_alpha: set[int] = set()
    frames: list[dict] = []

    def take(results):
        for row, rel, err, info in results:
            if err is None:
                if info[0]:
                    with_alpha.add(row)
                if info[1] is not None:
                    frames.append(info[1])
                continue
            if err[0] == "size":
                raise ValueError(
                    f"images of different sizes in {display_path(root)}: {display_path(first_rel)} is "
                    f"{hw[0]}x{hw[1]} but {display_path(rel)} is {err[1][0]}x{err[1][1]} (HxW); "
                    "pass resize=(H, W) (--resize) to resize all")
            if not skip_bad:
                raise _cannot_read(root, rel, err[1])
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
    return with_alpha, frames, used


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
    classes, rels, label_of, ignored = list_image_folder(root, order)
    n = len(rels)
    origin = folder_origin(root, order)
    signature = _signature(root, rels, size, ignored)
    meta = _load_index(work_dir, signature)
    if meta is not None:
        if stats is not None:
            stats.update(images=len(meta["paths"]), seconds=time.perf_counter() - t0, images_per_s=None,
                         workers=0, reused=True)
        return _image_set(work_dir, meta, origin)

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / INDEX_FILE).unlink(missing_ok=True)
    alpha_path = work_dir / ALPHA_FILE
    alpha_path.unlink(missing_ok=True)  # created again by the first image with alpha
    skipped: dict[int, dict] = {}
    first, hw = _first_readable(root, rels, size, skip_bad, skipped)
    path = work_dir / IMAGES_FILE
    m = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, *hw))
    offset = int(m.offset)
    del m
    with_alpha, frames, used = _decode_all(root, rels, first, hw, size, path, offset, alpha_path, n, workers,
                                           progress, skip_bad, skipped)
    keep = [i for i in range(n) if i not in skipped]
    if skipped and order is not None:
        first_bad = skipped[min(skipped)]
        raise ValueError(f"{len(skipped)} image(s) of {display_path(root)} could not be read (first: "
                         f"{display_path(first_bad['path'])}: {first_bad['reason']}); with an order file every "
                         "index must hold its image, so none can be skipped: fix or replace them")
    if skipped:
        kept = {label_of[i] for i in keep}
        gone = [c for i, c in enumerate(classes) if i not in kept]
        if gone:
            raise ValueError(f"no readable images left in class folder(s) {', '.join(map(display_path, gone))} "
                             f"of {display_path(root)}")
    has_alpha = bool(with_alpha)
    if has_alpha:
        _fill_opaque(alpha_path, [i for i in keep if i not in with_alpha], hw)
    if skipped:
        _compact(path, keep, (n, 3, *hw))
        if has_alpha:
            _compact(alpha_path, keep, (n, *hw))
    for p in (path, alpha_path) if has_alpha else (path,):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    ignored = sorted(ignored + frames, key=lambda d: d["path"])
    meta = {"signature": signature, "shape": [len(keep), 3, *hw], "classes": classes,
            "paths": [rels[i] for i in keep], "labels": [label_of[i] for i in keep],
            "skipped": [skipped[i] for i in sorted(skipped)], "ignored": ignored, "alpha": has_alpha,
            "resize": list(size) if size else None}
    write_json_atomic(work_dir / INDEX_FILE, meta)
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats.update(images=len(keep), seconds=seconds, images_per_s=len(keep) / max(seconds, 1e-9), workers=used,
                     reused=False)
    return _image_set(work_dir, meta, origin)


def _fill_opaque(path: Path, rows: list[int], hw) -> None:
    """Write 255 (opaque) into ``rows`` of the alpha .npy: the images without alpha."""
    from ..generation.rowfile import RowFile, chunk_rows

    f = RowFile(path, writable=True)
    try:
        step = chunk_rows(f.row_bytes)
        for a in range(0, len(rows), step):
            part = rows[a:a + step]
            f.write(part, torch.full((len(part), *hw), 255, dtype=torch.uint8))
    finally:
        f.close()


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
