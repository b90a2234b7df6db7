"""The data set of a run on its store's device, and the seeded generator of its randomness.

Every shuffle, flip and random transform of a method is drawn from ``gen``, one
CPU generator seeded by the method's seed and saved in every checkpoint, so a run
is fixed by its seed and a resumed run draws what the uninterrupted one drew.

Images live on the device, in (pinned) host memory, or on disk (a ``.npy`` of uint8
rows read by positional I/O, :mod:`.rowfile`). When they, or the perturbation store,
are on disk, iterating a batch plan with :meth:`Plan.streamed` reads the next batch's
rows in a background thread (into pinned buffers on a CUDA run) while the current one
computes, so the device waits for neither the disk nor the copy when the disk keeps up.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .rowfile import RowFile, chunk_rows


class Plan(list):
    """The index batches [B] of a pass, in order; :meth:`streamed` iterates them with read-ahead.

    Under torchrun the batches are this rank's parts of the global batches (local indices)
    and ``parts`` says where they sit in them (:class:`~.distributed.Part`).
    """

    def __init__(self, batches, data: "Batches", parts=None):
        super().__init__(batches)
        self.data = data
        self.parts = parts

    def __getitem__(self, k):
        got = super().__getitem__(k)
        if isinstance(k, slice):
            return Plan(got, self.data, self.parts[k] if self.parts is not None else None)
        return got

    def streamed(self):
        return self.data.stream(self)

    def size(self, k: int) -> int:
        """The size of global batch ``k`` (this process's part of it is ``self[k]``)."""
        return self.parts[k].size if self.parts is not None else len(self[k])


class Draws:
    """Per-sample random draws for one batch from the run's generator ``gen``.

    Alone (``part`` None) a draw for ``rows`` samples is ``torch.rand((rows, *shape))``. Under
    torchrun it is made for the whole global batch of ``part`` and indexed by this process's
    positions in it, so every process's generator stays in step with one process's and each
    sample gets the draw one process gives it. ``views`` > 1: the rows are that many
    view-major blocks of the batch's samples (block k holds the k-th view of every sample),
    drawn as one process draws ``views x batch`` rows; given explicitly, since a process may
    hold none of a batch's samples and must still draw for all of them.
    """

    def __init__(self, gen: torch.Generator, part=None):
        self.gen, self.part = gen, part

    def _draw(self, fn, rows: int, shape: tuple, views: int) -> torch.Tensor:
        if self.part is None:
            return fn((rows, *shape))
        size, pos = self.part.size, self.part.positions
        if rows != views * len(pos):
            raise ValueError(f"{rows} rows are not {views} view(s) of this process's {len(pos)} samples")
        full = fn((views * size, *shape))
        if views == 1:
            return full[pos]
        return full[(torch.arange(views)[:, None] * size + pos).reshape(-1)]

    def rand(self, rows: int, *shape: int, views: int = 1) -> torch.Tensor:
        """Uniform [0, 1) draws [rows, *shape] on the CPU."""
        return self._draw(lambda s: torch.rand(s, generator=self.gen), rows, shape, views)

    def randn(self, rows: int, *shape: int, views: int = 1) -> torch.Tensor:
        """Standard normal draws [rows, *shape] on the CPU."""
        return self._draw(lambda s: torch.randn(s, generator=self.gen), rows, shape, views)

    def randint(self, high: int, rows: int, *shape: int, views: int = 1) -> torch.Tensor:
        """Integers in [0, high) [rows, *shape] on the CPU."""
        return self._draw(lambda s: torch.randint(0, high, s, generator=self.gen), rows, shape, views)


def streamed(batches):
    """Iterate ``batches`` with read-ahead when it is a :class:`Plan`."""
    return batches.streamed() if isinstance(batches, Plan) else iter(batches)


class Batches:
    """Images uint8 [N, 3, H, W] on ``place`` (the device, pinned host memory that streams, or
    "disk"), labels int64 [N] on ``device``, and the generator ``gen``.

    On disk the images are read from ``images_file`` (a uint8 ``.npy`` [N, 3, H, W] holding
    ``images``, e.g. the ingested folder), or written to ``work_dir/images.npy`` first.
    ``store``: the perturbation store whose rows are read ahead with the images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, place, seed: int, *,
                 images_file=None, work_dir=None, dist=None, dtype: torch.dtype = torch.float32):
        self.device = device
        self.dtype = dtype  # of the images as float
        self.on_disk = place == "disk"
        self.place = torch.device("cpu") if self.on_disk else torch.device(place)
        self.shape = tuple(images.shape)
        self.store = None
        self.dist = dist
        self.n = len(labels)  # samples of the whole set (permutations are drawn over them)
        self.lo, self.hi = dist.shard(self.n) if dist is not None else (0, self.n)  # the rows this process owns
        if self.on_disk:
            self.images = None
            self.file, self.file_offset = self._images_file(images, images_file, work_dir)
        else:
            self.images = images[self.lo:self.hi].to(self.place)
            if self.place.type == "cpu" and device.type == "cuda":
                self.images = self.images.pin_memory()
        self.labels = labels[self.lo:self.hi].to(device, torch.int64)  # local
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self._ready: tuple | None = None  # (idx, images, delta or None) read ahead
        self.part = None  # the current batch's place in its global batch (torchrun)

    def _images_file(self, images, images_file, work_dir) -> tuple[RowFile, int]:
        """The file the images are read from, and the row of local sample 0 in it."""
        if images_file is not None:
            f = RowFile(images_file)
            if f.shape != self.shape or f.dtype != torch.uint8:
                raise ValueError(f"{images_file} holds {f.dtype} {f.shape}, not the images' uint8 {self.shape}")
            return f, self.lo
        if work_dir is None:
            raise ValueError("images on disk need an images file or the run's work folder")
        # This process's shard only (all of them without torchrun), in a file of its own.
        name = "images.npy" if self.dist is None else f"images.rank{self.dist.rank}.npy"
        f = RowFile.create(Path(work_dir) / name, (self.hi - self.lo, *self.shape[1:]), torch.uint8)
        step = chunk_rows(math.prod(self.shape[1:]))
        for i in range(self.lo, self.hi, step):
            f.write_range(i - self.lo, images[i:min(i + step, self.hi)])
        f.sync()
        return RowFile(f.path), 0

    @property
    def local_n(self) -> int:
        return self.hi - self.lo

    def read(self, start: int, stop: int) -> torch.Tensor:
        """uint8 images of this process's samples start..stop-1, on their place (the CPU from disk)."""
        if self.on_disk:
            return self.file.read_range(start + self.file_offset, stop + self.file_offset)
        return self.images[start:stop]

    def batch_size(self, idx: torch.Tensor) -> int:
        """The size of the (global) batch ``idx`` belongs to."""
        return self.part.size if self.part is not None else len(idx)

    def stream(self, batches):
        """Yield the batches of ``batches`` while a thread reads the next one's rows ahead."""
        parts = getattr(batches, "parts", None)
        try:
            for k, idx in enumerate(self._read_ahead(batches)):
                self.part = parts[k] if parts is not None else None
                yield idx
        finally:
            self.part = None

    def _read_ahead(self, batches):
        store = self.store if (self.store is not None and self.store.on_disk) else None
        if not (self.on_disk or store is not None) or len(batches) == 0:
            yield from batches
            return
        pin = self.device.type == "cuda"

        def load(idx):
            x = self.file.read(idx + self.file_offset) if self.on_disk else None
            d = None
            if store is not None:
                d = store._read(idx if store.row_of is None else store.row_of[idx])
            if pin:
                x = x.pin_memory() if x is not None else None
                d = d.pin_memory() if d is not None else None
            return idx, x, d

        with ThreadPoolExecutor(1, thread_name_prefix="ue_fast-read") as pool:
            ahead = pool.submit(load, batches[0])
            try:
                for k, idx in enumerate(batches):
                    ready = ahead.result()
                    if k + 1 < len(batches):
                        ahead = pool.submit(load, batches[k + 1])
                    self._ready = ready
                    if store is not None:
                        store._ready = (ready[0], ready[2])
                    yield idx
            finally:
                self._ready = None
                if store is not None:
                    store._ready = None

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 rows of ``idx`` on their place (read-ahead ones when ready)."""
        if self._ready is not None and self._ready[0] is idx and self._ready[1] is not None:
            return self._ready[1]
        if self.on_disk:
            return self.file.read(idx + self.file_offset)
        return self.images[idx.to(self.place)]

    def shuffled(self, batch_size: int, *, merge_single: bool = False, drop_last: bool = False
                 ) -> list[torch.Tensor]:
        """Index batches [B] (on the device) of a fresh permutation; ``merge_single`` joins a last
        batch of one sample to the one before (batch norm cannot train on one sample);
        ``drop_last`` drops a last batch shorter than ``batch_size`` (unless it is the only one)."""
        perm = torch.randperm(self.n, generator=self.gen).to(self.device)
        out = [perm[i:i + batch_size] for i in range(0, self.n, batch_size)]
        if drop_last and len(out) > 1 and len(out[-1]) < batch_size:
            out.pop()
        if merge_single and len(out) > 1 and len(out[-1]) == 1:
            out[-2:] = [torch.cat(out[-2:])]
        return self._plan(out)

    def ordered(self, batch_size: int) -> list[torch.Tensor]:
        """Index batches [B] (on the device) in data-set order."""
        return self._plan([torch.arange(i, min(i + batch_size, self.n), device=self.device)
                           for i in range(0, self.n, batch_size)])

    def _plan(self, batches: list[torch.Tensor]) -> Plan:
        """Global batches -> this process's plan (its parts of them, local indices, under torchrun)."""
        if self.dist is None:
            return Plan(batches, self)
        from .distributed import split

        local, parts = zip(*(split(b, self.lo, self.hi) for b in batches)) if batches else ((), ())
        return Plan(list(local), self, list(parts))

    def clean(self, idx: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Clean images ``idx`` as float [B, 3, H, W] in [0, 1] on the device; ``flip``: each
        flipped horizontally with probability 1/2 (post-augmentation)."""
        x = self._rows(idx).to(self.device, non_blocking=True).to(self.dtype).div_(255)
        if flip:
            f = (self.rand(idx) < 0.5).to(self.device)
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def draws(self) -> Draws:
        """Draws for the samples of the current batch (see :class:`Draws`)."""
        return Draws(self.gen, self.part)

    def rand(self, idx: torch.Tensor, *shape: int) -> torch.Tensor:
        """Uniform draws [len(idx), *shape] on the CPU for the samples of the current batch ``idx``."""
        return self.draws().rand(len(idx), *shape)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
