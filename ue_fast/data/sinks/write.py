"""The rows of a run, rounded to 8 bits chunk by chunk and handed to every sink."""
from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ...generation.rowfile import RowFile, chunk_rows
from ...generation.placement import default_memory_budget
from ...progress import progress as _progress
from ..folders import ImageSet
from ..png import PNG_LEVEL
from . import DEFAULT_SINKS, SINKS
from .base import Rows, SinkContext
from .npy import npy_name
from .rounding import Rounder


def output_step(row_shape) -> int:
    """Rows per chunk of the outputs (float32 delta, int16 work copies, uint8 images)."""
    return chunk_rows(math.prod(row_shape) * 12)


def sink_context(output_dir: Path, data: ImageSet, eps: float, budget, class_levels=None, png_level: int = PNG_LEVEL,
                 workers: int = 1, method: str = "", poison_pt: str = "auto") -> SinkContext:
    """What the sinks of a run over ``data`` need to know."""
    return SinkContext(output_dir=output_dir, paths=data.paths, classes=data.classes, labels=data.labels,
                       alpha=data.alpha, shape=tuple(data.images.shape[1:]), eps=eps,
                       memory_limit=budget if budget is not None else default_memory_budget(),
                       class_levels=class_levels, origin=data.origin, members=getattr(data, "members", None),
                       png_level=png_level, workers=workers, method=method, poison_pt=poison_pt)


def planned_files(sinks: tuple[str, ...], output_dir: Path, data: ImageSet, eps: float, classwise: bool,
                  method: str = "") -> list[str]:
    """Every file the sinks may write, before any of them writes (what --overwrite may remove later)."""
    ctx = sink_context(output_dir, data, eps, None, (lambda: None) if classwise else None, method=method)
    return [f for name in sinks for f in SINKS[name]().planned(ctx)]


def write_outputs(output_dir: Path, data: ImageSet, result, eps: float, rounding: str, seed: int,
                  class_rows: torch.Tensor | None, budget, progress: bool, sinks: tuple[str, ...] = DEFAULT_SINKS,
                  png_level: int = PNG_LEVEL, workers: int = 1, method: str = "", poison_pt: str = "auto") -> dict:
    """Round every chunk of rows to 8 bits and hand it to each of ``sinks`` (``ue_fast.data.sinks``:
    by default the PNG tree, the perturbation .npy, poison.pt as ``poison_pt`` says, and for a
    class-wise method, ``class_rows`` being its [C, 3, H, W] perturbations, poison_classwise.pt).
    Memory stays bounded whatever N. Returns the statistics the manifest reports, with
    ``seconds``: the rounding's and each sink's own time."""
    classwise = class_rows is not None
    shape = tuple(data.images.shape[1:])
    rounder = Rounder(rounding, seed, data.labels if classwise else None, shape)
    ctx = sink_context(output_dir, data, eps, budget,
                       (lambda: rounder.class_levels(class_rows, eps)) if classwise else None, png_level, workers,
                       method, poison_pt)
    sinks = [SINKS[name]() for name in sinks]
    opened, timings = [], {}
    try:
        for sink in sinks:
            sink.open(ctx)
            opened.append(sink)
        stats = _write_chunks(data, result, eps, rounder, sinks, progress, timings)
        outputs = {}
        for sink in sinks:
            with _timed(timings, sink.name):
                outputs.update(sink.close())
        opened = []
    finally:
        for sink in opened:  # a failed run: let go of threads and files, the partial outputs stay for --resume
            sink.abort()
    return dict(stats, written=sinks[0].written, npy_name=npy_name(eps), outputs=outputs,
                seconds={k: round(v, 3) for k, v in timings.items()})


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


def _write_chunks(data: ImageSet, result, eps: float, rounder, sinks, progress: bool, timings: dict) -> dict:
    """Every chunk of rows rounded and handed to the sinks; a background sink's chunk is
    written on its own thread while the next chunk is rounded (one chunk in flight per sink)."""
    n, shape = len(data), tuple(data.images.shape[1:])
    clean_file = RowFile(data.file) if data.file is not None else None
    step = output_step(shape)
    linf = torch.empty(n, dtype=torch.int64)
    abs_sum, changed = 0.0, 0
    threads = {s.name: ThreadPoolExecutor(1, thread_name_prefix=f"ue_fast-{s.name}") for s in sinks if s.background}
    pending: dict[str, Future] = {}

    def timed_write(sink, rows):
        with _timed(timings, sink.name):
            sink.write(rows)

    try:
        with _progress(n, "writing images", "img", enabled=progress) as bar:
            for a in range(0, n, step):
                b = min(n, a + step)
                with _timed(timings, "rounding"):
                    clean = clean_file.read_range(a, b) if clean_file is not None else data.images[a:b]
                    delta = result.read(a, b)  # float32 [B, 3, H, W] pixel units
                    abs_sum += float(delta.abs().sum(dtype=torch.float64))
                    protected = rounder(clean, delta, eps, data.labels[a:b])
                    effective = protected.to(torch.int16) - clean.to(torch.int16)  # what the PNGs carry, in 1/255
                    linf[a:b] = effective.abs().amax(dim=(1, 2, 3))
                    changed += int((effective != 0).sum())
                rows = Rows(a, b, protected, effective)
                for sink in sinks:
                    if sink.background:
                        if sink.name in pending:
                            pending.pop(sink.name).result()  # the previous chunk written (or its error raised)
                        pending[sink.name] = threads[sink.name].submit(timed_write, sink, rows)
                    else:
                        timed_write(sink, rows)
                bar.update(b - a)
            for name in list(pending):
                pending.pop(name).result()
    finally:
        for t in threads.values():
            t.shutdown(wait=True)  # after a failure too: no thread writes once this returns
    row_elems = math.prod(shape)
    return dict(linf=linf, unchanged=int((linf == 0).sum()), mean_abs_255=abs_sum / (n * row_elems) * 255,
                changed_fraction=changed / (n * row_elems))
