"""Arrays on disk read and written by rows with positional I/O: the disk tier of the stores.

A :class:`RowFile` is a ``.npy`` file (``np.load(path, mmap_mode="r")`` opens it) of
shape [R, *row_shape]. Rows are read and written with ``os.preadv``/``os.pwritev``
into and out of the caller's buffers, never through a memory map: pages of a map
count as resident memory of the process for as long as they stay mapped, whereas
positional reads leave the data in the kernel's page cache, which the kernel reclaims
under pressure. So a run over a store far larger than memory keeps a resident size
set by its batches, not by N.

Rows of a batch are read in ascending order and runs of consecutive rows coalesce
into one call, so a pass in data-set order reads large blocks.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

_TORCH_OF = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int8): torch.int8, np.dtype(np.int16): torch.int16,
             np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
_NUMPY_OF = {v: k for k, v in _TORCH_OF.items()}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype not in _NUMPY_OF:
        raise ValueError(f"no disk rows of dtype {dtype}")
    return _NUMPY_OF[dtype]


def _runs(rows: np.ndarray):
    """Sorted rows -> (start position in ``rows``, first row, count) of each run of consecutive rows."""
    if len(rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(rows)]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield s, int(rows[s]), e - s


class RowFile:
    """Rows of a ``.npy`` file, by positional I/O (see the module docstring)."""

    def __init__(self, path, *, writable: bool = False):
        self.path = Path(path)
        m = np.load(self.path, mmap_mode="r")  # parses the header only; closed below
        self.shape, self.np_dtype, self.offset = tuple(m.shape), m.dtype, int(m.offset)
        if not m.flags.c_contiguous or m.ndim < 1:
            raise ValueError(f"{self.path} is not a C-ordered array of rows")
        del m
        self.dtype = _TORCH_OF.get(self.np_dtype)
        if self.dtype is None:
            raise ValueError(f"{self.path} holds {self.np_dtype}; rows of uint8, int8, int16, float16 or float32 only")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.np_dtype.itemsize
        self.writable = writable
        self.fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    @classmethod
    def create(cls, path, shape, dtype: torch.dtype) -> "RowFile":
        """A new file of zeros (sparse where the file system allows), replacing any at ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        m = np.lib.format.open_memmap(path, mode="w+", dtype=numpy_dtype(dtype), shape=tuple(shape))
        del m
        return cls(path, writable=True)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- reading -------------------------------------------------------------------------
    def read(self, rows, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` (ints, any order, no repeats needed) -> a CPU tensor [B, *row_shape]
        (into ``out``, e.g. a pinned buffer, when given)."""
        rows = np.asarray(rows.cpu() if torch.is_tensor(rows) else rows, dtype=np.int64).reshape(-1)
        if out is None:
            out = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        if len(srt) and (srt[0] < 0 or srt[-1] >= self.shape[0]):
            raise IndexError(f"row out of range [0, {self.shape[0]}) in {self.path}")
        in_order = bool(np.all(order == np.arange(len(rows))))
        buf = out if in_order else torch.empty_like(out)
        view = buf.view(torch.uint8).reshape(len(rows), self.row_bytes).numpy()
        for pos, first, count in _runs(srt):
            self._pread(view[pos:pos + count], first)
        if not in_order:
            out[torch.from_numpy(order)] = buf
        return out

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        return self.read(np.arange(start, stop))

    def _pread(self, dest: np.ndarray, first: int) -> None:
        mv = memoryview(dest).cast("B")
        off, done = self.offset + first * self.row_bytes, 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], off + done)
            if n <= 0:
                raise OSError(f"short read from {self.path} at byte {off + done}")
            done += n

    # -- writing -------------------------------------------------------------------------
    def write(self, rows, values: torch.Tensor) -> None:
        """Write ``values`` [B, *row_shape] (converted to the file's dtype) to rows ``rows``."""
        if not self.writable:
            raise ValueError(f"{self.path} is open read-only")
        rows = np.asarray(rows.cpu() if torch.is_tensor(rows) else rows, dtype=np.int64).reshape(-1)
        values = values.detach().to("cpu", self.dtype).contiguous()
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        if len(srt) and (srt[0] < 0 or srt[-1] >= self.shape[0]):
            raise IndexError(f"row out of range [0, {self.shape[0]}) in {self.path}")
        if not np.all(order == np.arange(len(rows))):
            values = values[torch.from_numpy(order)]
        view = values.view(torch.uint8).reshape(len(rows), self.row_bytes).numpy()
        for pos, first, count in _runs(srt):
            mv = memoryview(view[pos:pos + count]).cast("B")
            off, done = self.offset + first * self.row_bytes, 0
            while done < len(mv):
                done += os.pwritev(self.fd, [mv[done:]], off + done)

    def write_range(self, start: int, values: torch.Tensor) -> None:
        self.write(np.arange(start, start + len(values)), values)

    def sync(self) -> None:
        """Make every write so far durable (fsync)."""
        os.fsync(self.fd)

    def copy_to(self, path) -> "RowFile":
        """A writable copy at ``path`` (kernel-side copy where the system offers one)."""
        shutil.copyfile(self.path, path)
        return RowFile(path, writable=True)


def chunk_rows(row_bytes: int, target_bytes: int = 64 << 20) -> int:
    """How many rows make a chunk of about ``target_bytes`` (at least 1)."""
    return max(1, target_bytes // max(row_bytes, 1))
