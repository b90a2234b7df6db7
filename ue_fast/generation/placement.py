"""Where a run's perturbation rows live and in which dtype: device memory, (pinned) host
memory or disk, chosen from the sizes and the memory free (:func:`choose_store`); the checks
of the ``delta_dtype`` and ``store`` settings and of a size such as ``64G``."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

DELTA_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
# Fraction of free memory (device, or host RAM for a host store) that images and
# perturbations may take; the rest is for the surrogate, activations and the OS.
STORE_MEMORY_FRACTION = 0.5
STORES = ("auto", "memory", "disk")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def check_delta_dtype(delta_dtype: str, eps: float) -> None:
    if delta_dtype not in DELTA_DTYPES:
        raise ValueError(f"delta_dtype must be one of {tuple(DELTA_DTYPES)}, got {delta_dtype!r}")
    if delta_dtype == "int8" and eps * 255 > 127 + 1e-6:
        raise ValueError(f"delta_dtype='int8' holds at most 127/255, got eps {eps * 255:g}/255")


def check_store(store: str) -> None:
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")


def parse_size(text) -> int:
    """Bytes of a size: an int, or "500M", "8G", "1.5GB", "2TiB" (powers of 1024)."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
        if not m:
            raise ValueError(f"not a size: {text!r} (examples: 500M, 8G, 1.5G, 2000000000)")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(value)


def default_memory_budget() -> float:
    """``STORE_MEMORY_FRACTION`` of the host memory available now (inf where unknown)."""
    return STORE_MEMORY_FRACTION * _host_available_bytes()


def _host_available_bytes() -> float:
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not Linux: no budget known
        return math.inf


@dataclass(frozen=True)
class Placement:
    """Where a run's images and perturbations live: ``images`` and ``delta`` are a torch
    device, or "disk"; ``dtype`` is the perturbations' dtype."""

    images: torch.device | str
    delta: torch.device | str
    dtype: torch.dtype

    @staticmethod
    def describe(place) -> str:
        return place if isinstance(place, str) else str(place)


def choose_store(device: torch.device, image_elems: int, delta_elems: int, delta_dtype: str, *,
                 store: str = "auto", memory_budget: float | None = None, small_delta: bool = False) -> Placement:
    """Where the images (uint8) and the perturbations live, and the perturbations' dtype.

    ``store="memory"``: on CUDA on the device when they fit ``STORE_MEMORY_FRACTION`` of its
    free memory, else in (pinned) host memory. ``store="disk"``: both on disk (the work
    folder), streamed by batches. ``store="auto"``: memory while images and perturbations
    fit ``memory_budget`` bytes of host memory (default ``default_memory_budget()``), else
    disk. ``delta_dtype="auto"`` takes float32 where it fits and float16 otherwise (device,
    then host), and float32 on disk. ``small_delta``: the perturbations are a few rows (one
    per class) and stay in memory even when the images go to disk.
    """
    check_store(store)
    wanted = DELTA_DTYPES[delta_dtype]
    dtypes = [wanted] if wanted is not None else [torch.float32, torch.float16]
    on_disk = wanted or torch.float32
    cpu = torch.device("cpu")
    if store == "disk":
        return Placement("disk", device if small_delta else "disk", on_disk if not small_delta else dtypes[0])
    budget = default_memory_budget() if memory_budget is None else float(memory_budget)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        for dt in dtypes:
            if image_elems + delta_elems * dt.itemsize <= STORE_MEMORY_FRACTION * free:
                return Placement(device, device, dt)
    for dt in dtypes:
        if store == "memory" or image_elems + delta_elems * dt.itemsize <= budget:
            if store == "memory" and image_elems + delta_elems * dt.itemsize > budget and dt is not dtypes[-1]:
                continue  # memory forced: the smallest dtype that fits, else the smallest
            return Placement(cpu, device if small_delta else cpu, dt)
    return Placement("disk", device if small_delta else "disk", dtypes[0] if small_delta else on_disk)
