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
"""
from __future__ import annotations

import math
import os

import torch

DELTA_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
# Fraction of free memory (device, or host RAM for a host store) that images and
# perturbations may take; the rest is for the surrogate, activations and the OS.
STORE_MEMORY_FRACTION = 0.5


def check_delta_dtype(delta_dtype: str, eps: float) -> None:
    if delta_dtype not in DELTA_DTYPES:
        raise ValueError(f"delta_dtype must be one of {tuple(DELTA_DTYPES)}, got {delta_dtype!r}")
    if delta_dtype == "int8" and eps * 255 > 127 + 1e-6:
        raise ValueError(f"delta_dtype='int8' holds at most 127/255, got eps {eps * 255:g}/255")


def _host_available_bytes() -> float:
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not Linux: no budget known
        return math.inf


def choose_store(device: torch.device, image_elems: int, delta_elems: int, delta_dtype: str
                 ) -> tuple[torch.device, torch.dtype]:
    """Where the images (uint8) and the perturbations live, and the perturbations' dtype.

    On CUDA they stay on the device when they fit ``STORE_MEMORY_FRACTION`` of its free
    memory, else in pinned host memory. ``delta_dtype="auto"`` takes float32 where it fits
    and float16 otherwise (on the device first, then on the host).
    """
    wanted = DELTA_DTYPES[delta_dtype]
    dtypes = [wanted] if wanted is not None else [torch.float32, torch.float16]
    places = [device] + ([torch.device("cpu")] if device.type == "cuda" else [])
    for place in places:
        free = torch.cuda.mem_get_info(place)[0] if place.type == "cuda" else _host_available_bytes()
        for dt in dtypes:
            if image_elems + delta_elems * dt.itemsize <= STORE_MEMORY_FRACTION * free:
                return place, dt
    return places[-1], dtypes[-1]  # over budget everywhere: the smallest; allocation will tell


class PerturbationStore:
    """Rows [R, 3, H, W] of perturbations in pixel units, starting at zero, bounded by ``eps``.

    ``row_of`` int64 [N] on the device maps samples to rows (class-wise: the labels); None
    means one row per sample. Reads return new float32 tensors on ``device``.
    """

    def __init__(self, rows: int, shape, *, device: torch.device, place: torch.device, dtype: torch.dtype,
                 eps: float, seed: int, row_of: torch.Tensor | None = None):
        self.device, self.place, self.eps, self.seed, self.row_of = device, place, eps, seed, row_of
        self.delta = torch.zeros((rows, *shape), dtype=dtype, device=place)
        if place.type == "cpu" and device.type == "cuda":
            self.delta = self.delta.pin_memory()
        self._round_gen = torch.Generator(device=device)
        self.passes = 0  # passes begun (numbers the int8 rounding noise)

    @property
    def dtype(self) -> torch.dtype:
        return self.delta.dtype

    @property
    def rows(self) -> int:
        return len(self.delta)

    def _float(self, d: torch.Tensor) -> torch.Tensor:
        return d.float().div_(255) if d.dtype == torch.int8 else d.float()

    def get(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` [B] as float32 [B, 3, H, W] on the device (indexing copies)."""
        return self._float(self.delta[rows.to(self.place)].to(self.device, non_blocking=True))

    def samples(self, idx: torch.Tensor) -> torch.Tensor:
        """The perturbations of samples ``idx`` [B] (class-wise: of their classes)."""
        return self.get(idx if self.row_of is None else self.row_of[idx])

    def all(self) -> torch.Tensor:
        """Every row as a new float32 tensor on the device."""
        d = self.delta.to(self.device)
        return d.float().div(255) if d.dtype == torch.int8 else d.to(torch.float32, copy=True)

    def begin_pass(self) -> None:
        """Start the next pass over the rows: its int8 rounding noise is seeded by the seed and
        the pass's number, so a run resumed at a pass boundary draws the same noise."""
        self.passes += 1
        self._round_gen.manual_seed((self.seed * 1_000_003 + self.passes) % (2**63))

    def put(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """Write float perturbations [B, 3, H, W] to rows ``rows`` [B] (float16 rounds to nearest,
        int8 stochastically; an integer bound is never crossed)."""
        if self.delta.dtype == torch.int8:
            v = delta.float() * 255
            u = torch.rand(v.shape, generator=self._round_gen, device=v.device)
            lim = math.floor(self.eps * 255 + 1e-6)
            delta = v.add_(u).floor_().clamp_(-lim, lim)
        self.delta[rows.to(self.place)] = delta.to(self.place, self.delta.dtype)

    def per_sample_cpu(self) -> torch.Tensor:
        """float32 [N, 3, H, W] on the CPU in pixel units (class-wise rows expanded to samples)."""
        d = self._float(self.delta.cpu())
        return d if self.row_of is None else d[self.row_of.cpu()]

    def state_dict(self) -> dict:
        return {"delta": self.delta.cpu(), "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        d = state["delta"]
        if d.shape != self.delta.shape:
            raise ValueError(f"checkpoint perturbations have shape {tuple(d.shape)}, not {tuple(self.delta.shape)}")
        if d.dtype != self.delta.dtype:
            # Only "auto" can differ (the settings matched): keep the checkpoint's dtype, so
            # the resumed run continues the same arithmetic.
            pin = self.delta.is_pinned()
            self.delta = torch.empty_like(self.delta, dtype=d.dtype)
            if pin:
                self.delta = self.delta.pin_memory()
        self.delta.copy_(d)
        self.passes = int(state["passes"])
