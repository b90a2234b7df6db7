"""The runner: a method's stages, checkpointed after every step, resumed exactly.

A method (``ue_fast.methods``) is set up with a :class:`RunContext` and hands the
runner a list of :class:`Stage`: a name, a number of steps and a function running
step i. The runner runs the steps in order, appends each step's record to the
history, checkpoints after every step (atomically; ``ue_fast.checkpoint``) and, on
resume, restores the method's state and continues with the next step, so a resumed
run reaches the result of an uninterrupted one (bit for bit on the CPU with the same
thread count; on CUDA up to the non-determinism of cuDNN kernels). A step whose
record says ``finished`` ends its stage early. The runner knows no method: it sees
only stages, records and the method's ``state_dict``.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..progress import progress as _progress
from .context import RunContext, Timer
from .rowfile import RowFile, chunk_rows


@dataclass
class Stage:
    """``steps`` steps of ``run(i)`` (i = 1..steps), each returning its history record.

    ``key`` names the step counter in the record ("epoch" marks the rounds of the
    bi-level loop: the manifest counts them and profiling traces the first one).
    """

    name: str
    steps: int
    run: Callable[[int], dict]
    key: str = "epoch"


@dataclass
class RunResult:
    read: Callable[[int, int], torch.Tensor]  # (start, stop) -> float32 [stop - start, 3, H, W] on the CPU
    n: int  # samples
    history: list[dict]  # a record per step of every stage
    timings: dict[str, float] = field(default_factory=dict)  # seconds per timed part, whole run
    resumed_from: int = 0  # rounds (records with "epoch") done before this call

    @property
    def delta(self) -> torch.Tensor:
        """Every perturbation, [N, 3, H, W] float32 in pixel units ([-eps, eps]), on the CPU
        (O(N) memory: read a large run by chunks with ``read``)."""
        return self.read(0, self.n)


def fingerprint(images: torch.Tensor, labels: torch.Tensor, file=None) -> str:
    """A hash of the data, so a checkpoint is never resumed on other images. With ``file`` (a
    uint8 .npy holding ``images``) the rows are read from it by chunks, so a set on disk is
    hashed in bounded memory (reading a memory map would keep every page resident)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(images.shape)).encode())
    rows = RowFile(file) if file is not None else None
    step = chunk_rows(images[0].numel() if len(images) else 1)
    for i in range(0, len(images), step):
        part = rows.read_range(i, min(i + step, len(images))) if rows is not None else images[i:i + step]
        h.update(part.contiguous().cpu().numpy().tobytes())
    h.update(labels.cpu().numpy().astype("int64").tobytes())
    return h.hexdigest()


_clock = time.monotonic  # the checkpoint interval's clock (a test moves it)


class Runner:
    """Runs ``method`` over ``images`` uint8 [N, 3, H, W] with ``labels`` [N] on ``device``.

    Run options: ``checkpoint_path`` (None: no checkpoints), ``checkpoint_every`` (seconds: 0, the
    runner's default, checkpoints after every step; more, after a step once that long has passed
    since the last one or the start; a resume is exact from whichever exists),
    ``progress``, ``amp`` (bf16
    autocast; default on CUDA), ``profile`` (synchronise to time every part), ``trace_path``
    (a torch.profiler trace of the first round), ``compile`` (``torch.compile`` mode of the
    surrogate), ``delta_dtype`` (the perturbation store's dtype: "auto", "float32",
    "float16" or "int8"), ``store`` ("auto", "memory" or "disk": where images and
    perturbations live), ``memory_budget`` (host bytes they may take before "auto" goes to
    disk), ``work_dir`` (a disk store's files; default the checkpoint's folder) and
    ``images_file`` (the images as a uint8 ``.npy``, read from disk instead of rewritten).

    Under torchrun (``dist``, a :class:`~.distributed.Dist`) every process runs the same
    stages on its shard; ``sync_bn`` takes batch-norm statistics over the global batch.
    ``float64`` computes images, the surrogate and the losses in double precision (slow; it
    shows that a torchrun run is one process's up to rounding, which SGD otherwise amplifies).
    Checkpoints are then one file per process, ``checkpoint.rank<r>-of-<K>.<g>.pt`` in two
    generations g that alternate, and ``checkpoint.pt``, written by rank 0 after every
    process has written its file (and before any goes on), naming the complete generation;
    a resume needs the same number of processes.
    """

    def __init__(self, method, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 device: str | torch.device = "cpu", *, checkpoint_path: str | Path | None = None,
                 progress: bool = True, amp: bool | None = None, profile: bool = False,
                 trace_path: str | Path | None = None, compile: bool | str = False, delta_dtype: str = "auto",
                 store: str = "auto", memory_budget: float | None = None, work_dir: str | Path | None = None,
                 images_file: str | Path | None = None, dist=None, sync_bn: bool = False, float64: bool = False,
                 notify: Callable[[str], None] | None = None, checkpoint_every: float = 0.0):
        device = torch.device(device)
        self.notify = notify  # one line per stage: its time per step and the estimate for the rest
        if work_dir is None and checkpoint_path is not None:
            work_dir = Path(checkpoint_path).parent
        # bf16 autocast on CUDA; on the CPU it would cost accuracy for no speed.
        if amp is None:
            amp = device.type == "cuda" and not float64
        self.ctx = RunContext(device, amp=amp, compile=compile,
                              delta_dtype=delta_dtype, progress=progress, timer=Timer(device, profile), store=store,
                              memory_budget=memory_budget, work_dir=Path(work_dir) if work_dir is not None else None,
                              images_file=Path(images_file) if images_file is not None else None,
                              dist=dist, sync_bn=sync_bn, float64=float64)
        self.method = method
        self.n = len(images)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float)) \
                or not 0 <= checkpoint_every < float("inf"):
            raise ValueError(f"checkpoint_every must be a number of seconds >= 0, got {checkpoint_every!r}")
        self.checkpoint_every = float(checkpoint_every)  # 0: after every step
        self._last_checkpoint = _clock()
        self.trace_path = Path(trace_path) if trace_path else None
        self.fingerprint = fingerprint(images, labels, self.ctx.images_file)
        method.setup(self.ctx, images, labels, num_classes)
        self.stages = method.stages()
        self.history: list[dict] = []
        self.stage = 0  # index of the stage in progress
        self.done = 0  # its steps done
        self.ended = False  # a record of it said "finished"
        self.generation = 1  # under torchrun: the last checkpoint generation written (0 or 1)

    # -- state -------------------------------------------------------------------------------
    def _settings(self) -> dict:
        out = {**self.method.settings(), "delta_dtype": self.ctx.delta_dtype}
        if self.ctx.dist is not None:
            out["sync_bn"] = self.ctx.sync_bn
        if self.ctx.float64:  # only when set: checkpoints without it stay resumable
            out["float64"] = True
        return out

    def _state(self) -> dict:
        return dict(method=self.method.name, settings=self._settings(), fingerprint=self.fingerprint,
                    stage=self.stage, done=self.done, ended=self.ended, history=self.history,
                    state=self.method.state_dict())

    def load(self, state: dict) -> None:
        if state["method"] != self.method.name:
            raise ValueError(f"checkpoint is of method {state['method']!r}, not {self.method.name!r}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("checkpoint was made from other images or labels; start anew with --overwrite")
        mine, theirs = self._settings(), state["settings"]
        # Every setting, epochs included: the schedules depend on them, so a changed setting
        # could not reach the result of any uninterrupted run.
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        diff.update({k: (v, None) for k, v in theirs.items() if k not in mine})
        if diff:
            raise ValueError(f"checkpoint settings differ from this run's: {diff} (as (checkpoint, now))")
        self.method.load_state_dict(state["state"])
        self.history = list(state["history"])
        self.stage, self.done, self.ended = int(state["stage"]), int(state["done"]), bool(state["ended"])

    def _checkpoint_due(self) -> bool:
        """After a step: with ``checkpoint_every`` 0, always; otherwise once that many seconds have
        passed since the last checkpoint (or the run's start): a crash loses at most that much work,
        whatever the stage (rank 0 decides for every process under torchrun)."""
        if self.checkpoint_every == 0:
            return True
        due = _clock() - self._last_checkpoint >= self.checkpoint_every
        if self.ctx.dist is not None:
            import torch.distributed as tdist

            flag = torch.tensor([float(due)], device=self.ctx.device)  # NCCL takes GPU tensors only
            tdist.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def _checkpoint(self) -> None:
        self._last_checkpoint = _clock()
        if self.checkpoint_path is None:
            return
        with self.ctx.timer("checkpoint"):
            d = self.ctx.dist
            if d is None:
                save_checkpoint(self.checkpoint_path, self._state())
                return
            import torch.distributed as tdist

            self.generation = 1 - self.generation
            save_checkpoint(self._rank_file(d.rank, self.generation), self._state())
            tdist.barrier()  # every process's file of this generation is complete
            if d.main:
                save_checkpoint(self.checkpoint_path, {"world": d.world, "generation": self.generation})
            tdist.barrier()  # no process overwrites the last generation before the state names this one

    def _rank_file(self, rank: int, generation: int) -> Path:
        return self.checkpoint_path.with_name(f"checkpoint.rank{rank}-of-{self.ctx.dist.world}.{generation}.pt")

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
        d = self.ctx.dist
        world = state.get("world") if "world" in state else 1
        if (d.world if d is not None else 1) != world:
            how = (f"torchrun --nproc_per_node (and --nnodes) giving {world} processes" if world > 1
                   else "one process (no torchrun)")
            raise ValueError(f"{self.checkpoint_path} was written by a run of {world} process(es), this one has "
                             f"{d.world if d is not None else 1}: resume it with {how}, or start anew (--overwrite)")
        if d is None:
            self.load(state)
            return
        self.generation = int(state["generation"])
        self.load(load_checkpoint(self._rank_file(d.rank, self.generation)))

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunResult:
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self._resume()
        resumed_from = sum("epoch" in h for h in self.history)
        while self.stage < len(self.stages):
            stage = self.stages[self.stage]
            if self.done < stage.steps and not self.ended:
                self._run_stage(stage)
            self.stage, self.done, self.ended = self.stage + 1, 0, False
        read = getattr(self.method, "read_perturbations", None)
        if read is None:  # a method that only gives them all at once
            read = lambda start, stop: self.method.perturbations()[start:stop]  # noqa: E731
        if self.ctx.dist is not None:  # every process calls it alike; each gets the rows of all
            from .distributed import gather_range

            local = read
            read = lambda start, stop: gather_range(local, self.ctx.dist, self.n, start, stop,  # noqa: E731
                                                    self.ctx.device)
        return RunResult(read=read, n=self.n, history=self.history,
                         timings=dict(self.ctx.timer.total), resumed_from=resumed_from)

    def _run_stage(self, stage: Stage) -> None:
        bar = _progress(stage.steps, f"{self.method.name} {stage.name}", stage.key.replace("_", " "),
                        initial=self.done, enabled=self.ctx.progress, interval=0)
        first = True
        try:
            while self.done < stage.steps and not self.ended:
                i = self.done + 1
                with self._maybe_trace(stage):
                    t0 = time.perf_counter()
                    record = stage.run(i)
                    seconds = time.perf_counter() - t0
                record = {stage.key: i, **record}
                record["finished"] = bool(record.get("finished", False))
                record.setdefault("images_per_s", self.n / max(seconds, 1e-9))
                self.history.append(record)
                self.done, self.ended = i, record["finished"]
                if self._checkpoint_due():
                    self._checkpoint()
                if first and self.notify is not None and not self.ended and self.done < stage.steps:
                    self.notify(self._estimate(stage, seconds))
                first = False
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("train_acc", "poison_loss", "images_per_s")
                                 if record.get(k) is not None})
                bar.update(1)
        finally:
            bar.close()

    def _estimate(self, stage: Stage, seconds: float) -> str:
        """After a stage's first step: what the rest of it should take (a step that ends the
        stage early, as EM's stopping rule, makes it shorter)."""
        left = stage.steps - self.done
        later = [s.name for s in self.stages[self.stage + 1:]]
        return (f"{self.method.name} {stage.name}: {_duration(seconds)} per {stage.key.replace('_', ' ')}; "
                f"the {left} left take about {_duration(seconds * left)}"
                + (f", then {', '.join(later)} (timed when they start)" if later else ""))

    @contextlib.contextmanager
    def _maybe_trace(self, stage: Stage):
        """Record the first round of this call with torch.profiler (Chrome trace JSON)."""
        if self.trace_path is None or stage.key != "epoch":
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.ctx.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            yield
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))
        self.trace_path = None


def _duration(seconds: float) -> str:
    """12.3 s, 4.5 min, 2.1 h."""
    if seconds < 90:
        return f"{seconds:.3g} s"
    if seconds < 5400:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"
