"""Decode a stream of encoded images into the rows of a work folder's ``images.npy``, in
parallel, holding only a few batches of bytes at a time (the streamed sources: tables, LMDB)."""
from __future__ import annotations

import io
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ...progress import progress as _progress
from ..decode import _decode, _decode_error

CHUNK = 64


def _decode_into(images_path: str, offset: int, shape, size, tasks):
    m = np.memmap(images_path, dtype=np.uint8, mode="r+", offset=offset, shape=tuple(shape))
    out = []
    for row, data in tasks:
        try:
            d = _decode(io.BytesIO(data), size)
            if d.rgb.shape[:2] != tuple(shape[2:]):
                out.append((row, ("size", d.rgb.shape[:2])))
                continue
            m[row] = d.rgb.transpose(2, 0, 1)
            out.append((row, None))
        except MemoryError:
            raise
        except Exception as e:
            out.append((row, ("decode", _decode_error(e))))
    m.flush()
    return out


def decode_stream(items, n: int, path: Path, size, workers: int, progress: bool) -> tuple[tuple | None, dict]:
    """``items``: (row, encoded bytes or None) for rows 0..n-1, in any order. Writes
    ``path`` [n, 3, H, W] uint8, H and W from the first image that decodes (or ``size``).
    Returns (shape or None when nothing decoded, {row: (kind, detail)} of the rows that failed:
    "none" (no bytes), "decode" (the error), "size" (its H, W))."""
    bad: dict[int, tuple] = {}
    shape, offset, batch, pending = None, 0, [], []
    pool = None
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx)

    def collect(keep: int, bar):
        while len(pending) > keep:
            res = pending.pop(0)
            res = res.result() if hasattr(res, "result") else res
            for row, err in res:
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
    return shape, bad


def bad_reason(err: tuple, shape, what: str) -> str:
    if err[0] == "size":
        return (f"{err[1][0]}x{err[1][1]} pixels where the first image is {shape[2]}x{shape[3]} (pass resize=(H, W) "
                "/ --resize to resize all)")
    if err[0] == "none":
        return f"no image bytes in its {what}"
    return f"cannot decode its {what}: {err[1]}"
