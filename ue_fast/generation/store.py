"""The perturbation store: one perturbation per row (a sample, or a class), in a chosen dtype.

Rows live on the device when they fit, else in pinned host memory (batches then
stream). ``delta_dtype``:

- ``float32`` accumulates MI-UE's 0.2/255 steps as the authors' code does;
- ``float16`` (the authors' choice for ImageNet-100) has a spacing of at most 0.008/255
  within 8/255, so it keeps such steps too at half the memory;
- ``int8`` holds whole grey levels and rounds stochastically (without bias) on every
  write: ``floor(255 delta + u)`` with u uniform in [0, 1) rounds up with probability
  equal to the fraction, so steps far below one grey level still move delta in
  expectation (round-to-nearest would undo every net move under 0.5/255). The noise is
  reseeded per pass from the seed and the pass number, so a resumed run draws the same;
- ``auto``: float32, or float16 when float32 would not fit the memory budget.

A sample-wise method reads rows by sample index; a class-wise one keeps one row per
class and reads a sample's row through its label (:meth:`PerturbationStore.samples`).

Where rows live (``store``: "memory", "disk" or "auto"): on the device, in (pinned) host
memory, or on disk in the run's work folder. On disk the rows are two ``.npy`` files
that alternate by step: the first pass of a step copies the complete file to the other
one and works there, and the step's checkpoint (written last, atomically) names the
file that is complete. A crash at any moment leaves the named file untouched, so a
checkpoint costs O(model), not O(N), and still resumes exactly.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .placement import (  # noqa: F401 (their home was here)
    DELTA_DTYPES,
    STORE_MEMORY_FRACTION,
    STORES,
    Placement,
    check_delta_dtype,
    check_store,
    choose_store,
    default_memory_budget,
    parse_size,
)
from .rowfile import RowFile, chunk_rows

DISK = torch.device("cpu")  # rows on disk are read into CPU tensors


class PerturbationStore:
    """Rows [R, 3, H, W] of perturbations in pixel units, starting at zero, bounded by ``eps``.

    ``place``: a torch device (device or host memory, pinned for a CUDA run) or "disk" (two
    alternating files ``<name>.0.npy``/``<name>.1.npy`` in ``work_dir``, see the module
    docstring). ``row_of`` int64 [N] on the device maps samples to rows (class-wise: the
    labels); None means one row per sample. Reads return new float32 tensors on ``device``.
    """

    def __init__(self, rows: int, shape, *, device: torch.device, place, dtype: torch.dtype,
                 eps: float, seed: int, row_of: torch.Tensor | None = None, work_dir=None, name: str = "delta"):
        self.device, self.eps, self.seed, self.row_of = device, eps, seed, row_of
        self.on_disk = place == "disk"
        self.place = DISK if self.on_disk else torch.device(place)
        self.shape = (rows, *shape)
        self._dtype = dtype
        self.name = name
        if self.on_disk:
            if work_dir is None:
                raise ValueError("a store on disk needs the run's work folder")
            self.work_dir = Path(work_dir)
            # Created at first use, so that a resumed run opens its checkpoint's file instead.
            self.files: list[RowFile | None] = [None, None]
            self.current, self.writing = 0, None  # the complete file; the one this step writes
            self.delta = None
        else:
            self.delta = torch.zeros(self.shape, dtype=dtype, device=self.place)
            if self.place.type == "cpu" and device.type == "cuda":
                self.delta = self.delta.pin_memory()
        self._round_gen = torch.Generator(device=device)
        self.passes = 0  # passes begun (numbers the int8 rounding noise)
        self._ready: tuple | None = None  # (sample idx, raw rows) read ahead by Batches.stream

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def where(self) -> str:
        """"disk", "cpu" or the device, for the manifest."""
        return "disk" if self.on_disk else str(self.place)

    def _path(self, k: int) -> Path:
        return self.work_dir / f"{self.name}.{k}.npy"

    def _file(self) -> RowFile:
        if self.files[self.current] is None:
            self.files[self.current] = RowFile.create(self._path(self.current), self.shape, self.dtype)
        return self.files[self.current if self.writing is None else self.writing]

    def _float(self, d: torch.Tensor) -> torch.Tensor:
        return d.float().div_(255) if d.dtype == torch.int8 else d.float()

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        """Raw rows (the store's dtype) on the store's place."""
        if self.on_disk:
            return self._file().read(rows)
        return self.delta[rows.to(self.place)]

    def get(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` [B] as float32 [B, 3, H, W] on the device (indexing copies)."""
        return self._float(self._read(rows).to(self.device, non_blocking=True))

    def samples(self, idx: torch.Tensor) -> torch.Tensor:
        """The perturbations of samples ``idx`` [B] (class-wise: of their classes)."""
        if self._ready is not None and self._ready[0] is idx:
            raw, self._ready = self._ready[1], None  # once: a second read sees this pass's writes
            return self._float(raw.to(self.device, non_blocking=True))
        return self.get(idx if self.row_of is None else self.row_of[idx])

    def all(self) -> torch.Tensor:
        """Every row as a new float32 tensor on the device (O(rows) memory: not for a disk store)."""
        if self.on_disk:
            raise ValueError("the whole perturbation set cannot be loaded from a disk store; "
                             "this method needs --store memory")
        d = self.delta.to(self.device)
        return d.float().div(255) if d.dtype == torch.int8 else d.to(torch.float32, copy=True)

    def begin_pass(self) -> None:
        """Start the next pass over the rows: its int8 rounding noise is seeded by the seed and
        the pass's number, so a run resumed at a pass boundary draws the same noise. On disk,
        the first pass of a step moves to the other file (a copy of the complete one)."""
        self.passes += 1
        self._round_gen.manual_seed((self.seed * 1_000_003 + self.passes) % (2**63))
        if self.on_disk and self.writing is None:
            other = 1 - self.current
            src = self._file()
            if self.files[other] is not None:
                self.files[other].close()
            self.files[other] = src.copy_to(self._path(other))
            self.writing = other

    def put(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """Write float perturbations [B, 3, H, W] to rows ``rows`` [B] (float16 rounds to nearest,
        int8 stochastically; an integer bound is never crossed)."""
        if self.dtype == torch.int8:
            v = delta.float() * 255
            u = torch.rand(v.shape, generator=self._round_gen, device=v.device)
            lim = math.floor(self.eps * 255 + 1e-6)
            delta = v.add_(u).floor_().clamp_(-lim, lim)
        if self.on_disk:
            if self.writing is None:
                raise RuntimeError("a disk store is written between begin_pass() and the step's checkpoint")
            self.files[self.writing].write(rows, delta.to(self.dtype))
        else:
            self.delta[rows.to(self.place)] = delta.to(self.place, self.dtype)

    def copy_from(self, other: "PerturbationStore") -> None:
        """Make every row equal ``other``'s (same shape and dtype): a snapshot or its restore."""
        if other.shape != self.shape or other.dtype != self.dtype:
            raise ValueError("copy_from needs a store of the same shape and dtype")
        if not self.on_disk:
            self.delta.copy_(other.delta if not other.on_disk else other._file().read_range(0, other.rows))
            return
        self._file()
        if self.writing is None:
            self.writing = 1 - self.current
        if self.files[self.writing] is not None:
            self.files[self.writing].close()
        if other.on_disk:
            self.files[self.writing] = other._file().copy_to(self._path(self.writing))
        else:
            self.files[self.writing] = RowFile.create(self._path(self.writing), self.shape, self.dtype)
            self.files[self.writing].write_range(0, other.delta.cpu())

    def twin(self, name: str) -> "PerturbationStore":
        """An empty store like this one (same rows, dtype and place; its own files on disk, named
        ``name`` with this store's suffix: ``best.rank1`` for ``delta.rank1`` under torchrun)."""
        suffix = self.name.partition(".")[2]
        name = f"{name}.{suffix}" if suffix else name
        return PerturbationStore(self.rows, self.shape[1:], device=self.device,
                                 place="disk" if self.on_disk else self.place, dtype=self.dtype, eps=self.eps,
                                 seed=self.seed, row_of=self.row_of,
                                 work_dir=self.work_dir if self.on_disk else None, name=name)

    def chunk_rows(self) -> int:
        return chunk_rows(math.prod(self.shape[1:]) * 4)

    def read_samples(self, start: int, stop: int) -> torch.Tensor:
        """float32 [stop - start, 3, H, W] on the CPU: the perturbations of samples start..stop-1."""
        if self.row_of is not None:
            return self._float(self.delta.cpu())[self.row_of[start:stop].cpu()]
        if self.on_disk:
            return self._float(self._file().read_range(start, stop))
        return self._float(self.delta[start:stop].cpu())

    def per_sample_cpu(self) -> torch.Tensor:
        """float32 [N, 3, H, W] on the CPU in pixel units (class-wise rows expanded to samples)."""
        n = self.rows if self.row_of is None else len(self.row_of)
        return self.read_samples(0, n)

    def state_dict(self) -> dict:
        """In memory: the rows. On disk: ends the step (the written file is synced and becomes the
        complete one) and names it; the checkpoint holding this names the file to resume from."""
        if self.on_disk:
            if self.writing is not None:
                self.files[self.writing].sync()
                self.current, self.writing = self.writing, None
            return {"file": self.current, "passes": self.passes}
        return {"delta": self.delta.cpu(), "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        if "file" in state:
            if not self.on_disk:
                raise ValueError("this checkpoint keeps its perturbations on disk; resume it with --store disk")
            k = int(state["file"])
            path = self._path(k)
            if not path.exists():
                raise ValueError(f"the checkpoint names {path}, which is missing: start the run anew (--overwrite)")
            f = RowFile(path, writable=True)
            if f.shape != self.shape or f.dtype != self.dtype:
                raise ValueError(f"{path} holds {f.dtype} {f.shape}, not {self.dtype} {self.shape}")
            for g in self.files:
                if g is not None:
                    g.close()
            self.files = [None, None]
            self.files[k] = f
            self.current, self.writing = k, None
            self.passes = int(state["passes"])
            return
        d = state["delta"]
        if d.shape != self.shape:
            raise ValueError(f"checkpoint perturbations have shape {tuple(d.shape)}, not {tuple(self.shape)}")
        if self.on_disk:
            if d.dtype != self.dtype:
                raise ValueError(f"checkpoint perturbations are {d.dtype}, this disk store {self.dtype}")
            f = self._file()
            f.write_range(0, d)
            f.sync()
        else:
            if d.dtype != self.delta.dtype:
                # Only "auto" can differ (the settings matched): keep the checkpoint's dtype, so
                # the resumed run continues the same arithmetic.
                pin = self.delta.is_pinned()
                self.delta = torch.empty_like(self.delta, dtype=d.dtype)
                self._dtype = d.dtype
                if pin:
                    self.delta = self.delta.pin_memory()
            self.delta.copy_(d)
        self.passes = int(state["passes"])
