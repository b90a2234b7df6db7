"""What every block of a run shares: the device, autocast, compilation, stage timings, progress.

A ``RunContext`` holds run options only (how to run), never a method's algorithm
settings (what to compute); the runner makes one per run and hands it to the method.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..progress import progress as _progress

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class Timer:
    """Seconds per named stage; with ``sync`` (profiling) CUDA work is waited for at each stage end."""

    def __init__(self, device: torch.device, sync: bool = False):
        self.total: dict[str, float] = defaultdict(float)
        self.sync = sync and device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.total[stage] += time.perf_counter() - t0


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when of a narrower float (bf16 under autocast), float64 kept."""
    return t if t.dtype == torch.float64 else t.float()


def check_compile(mode) -> bool | str:
    """``mode`` if it is a valid ``compile`` option (False, True or one of ``COMPILE_MODES``)."""
    if not (mode is None or mode in (False, True) or mode in COMPILE_MODES):
        raise ValueError(f"compile must be False, True or one of {COMPILE_MODES}, got {mode!r}")
    return bool(mode) and mode


@dataclass
class RunContext:
    """Run options shared by the blocks: device, bf16 autocast, ``torch.compile`` mode, the
    perturbation store's requested dtype and place, progress bars and the stage timer."""

    device: torch.device
    amp: bool = False  # bf16 autocast of the surrogate
    compile: bool | str = False
    delta_dtype: str = "auto"
    progress: bool = True
    timer: Timer = field(default=None)  # type: ignore[assignment]
    store: str = "auto"  # where images and perturbations live: "auto", "memory" or "disk"
    memory_budget: float | None = None  # host bytes images + perturbations may take (None: the default)
    work_dir: Path | None = None  # where a disk store keeps its files
    images_file: Path | None = None  # the images as a uint8 .npy (an ingested folder), read when on disk
    dist: object | None = None  # distributed.Dist under torchrun, else None
    sync_bn: bool = False  # under torchrun: batch norm over the global batch
    float64: bool = False  # surrogate, images and losses in double precision (for checking, not speed)

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.compile = check_compile(self.compile)
        if self.float64 and self.amp:
            raise ValueError("float64 computes in double precision: it cannot run under bf16 autocast (amp)")
        if self.timer is None:
            self.timer = Timer(self.device)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of images, the surrogate and the losses."""
        return torch.float64 if self.float64 else torch.float32

    def autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def bar(self, total: int, desc: str | None):
        """A per-stage bar counting images (rate in images/s, with ETA); none when ``desc`` is None
        (a block called per batch inside a loop that shows its own bar)."""
        return _progress(total, desc or "", "img", enabled=self.progress and desc is not None, leave=False,
                         unit_scale=True)
