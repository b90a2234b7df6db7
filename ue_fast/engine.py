"""The bi-level loop shared by the poison generators.

For outer epoch (round) e = 1..E: train the surrogate (one epoch, or the
method's number of batches) with cross-entropy on ``x + delta``; then, with the
surrogate frozen in eval mode, run K projected gradient steps of the method's
poison loss on every shuffled batch of the data set. The method supplies the
loss, the schedules and the hooks (``ue_fast.methods.base``): clean pre-training
(AP), early stopping (EM), class-wise perturbations, inner adversaries (REM), a
fresh surrogate trained from scratch every round and one loss over the whole
set per step (the Bayes-error authors' schedule); training-free methods bypass
the loop. With ``sparse`` set (SALM), only the
given percentage of each image's most salient pixels (input-gradient magnitude
of the surrogate, taken once before the first poison pass) is perturbed.

State lives on the device: the images as uint8, the perturbation in the store's
dtype (``delta_dtype``: float32 by default, float16 when float32 does not fit the
memory budget, int8 in units of 1/255 with stochastic rounding on request), the
labels. Nothing reads a value back to the host
inside an epoch; losses and accuracies are summed on the device and read once
per epoch. A checkpoint is written atomically at the end of every outer epoch;
a resumed run continues to the same result as an uninterrupted one (bit for bit
on the CPU with the same thread count; on CUDA up to the non-determinism of cuDNN kernels).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .methods.base import DELTA_DTYPES
from .models import build_model
from .ops import pgd_step_
from .progress import progress as _progress


@dataclass
class RunResult:
    delta: torch.Tensor  # [N, 3, H, W] float32 in pixel units ([-eps, eps]), on the CPU (per sample)
    history: list[dict]  # per outer epoch: losses, accuracy, times
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, whole run
    resumed_from: int = 0  # outer epochs done before this call


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A hash of the data, so a checkpoint is never resumed on other images."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    h.update(labels.cpu().numpy().astype("int64").tobytes())
    return h.hexdigest()


class _Timer:
    """Seconds per stage; with ``sync`` (profiling) CUDA work is waited for at each stage end."""

    def __init__(self, device: torch.device, sync: bool):
        self.total = defaultdict(float)
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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# Fraction of free memory (device, or host RAM for a host store) that images and
# perturbations may take; the rest is for the surrogate, activations and the OS.
STORE_MEMORY_FRACTION = 0.5


def _host_available_bytes() -> float:
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not Linux: no budget known
        return math.inf


def choose_store(device: torch.device, image_elems: int, delta_elems: int, delta_dtype: str
                 ) -> tuple[torch.device, torch.dtype]:
    """Where the images (uint8) and the perturbations live, and the perturbations' dtype.

    On CUDA they stay on the device when they fit ``STORE_MEMORY_FRACTION`` of its free
    memory, else in pinned host memory (batches then stream). ``delta_dtype="auto"`` takes
    float32 where it fits and float16 otherwise (on the device first, then on the host).
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


def _compiled(model: torch.nn.Module, mode: bool | str):
    """``model`` itself (mode False), or ``torch.compile(model, mode=...)``; True means "default"."""
    if mode is False or mode is None:
        return model
    mode = "default" if mode is True else mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be False, True or one of {COMPILE_MODES}, got {mode!r}")
    return torch.compile(model, mode=mode)


class BiLevelEngine:
    """Runs a method's bi-level generation over a data set held on ``device``."""

    def __init__(self, method, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 device: str | torch.device = "cpu", *, checkpoint_path: str | Path | None = None,
                 progress: bool = True, amp: bool | None = None, profile: bool = False,
                 trace_path: str | Path | None = None, compile: bool | str = False):
        self.method = method
        self.cfg = method.config
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress = progress
        # bf16 autocast for the surrogate on CUDA; on the CPU it would cost accuracy for no speed.
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.timer = _Timer(self.device, profile)
        self.trace_path = Path(trace_path) if trace_path else None  # torch.profiler trace of one outer epoch
        self.fingerprint = fingerprint(images, labels)
        n, c, h, w = images.shape
        self.n = n
        rows = num_classes if method.classwise else n
        store, dtype = choose_store(self.device, images.numel(), rows * c * h * w, self.cfg.delta_dtype)
        self.store = store
        pin = store.type == "cpu" and self.device.type == "cuda"
        self.images = images.to(store)  # [N, 3, H, W] uint8
        # [N, 3, H, W], or [C, 3, H, W] for a class-wise method
        self.delta = torch.zeros((rows, c, h, w), dtype=dtype, device=store)
        if pin:
            self.images, self.delta = self.images.pin_memory(), self.delta.pin_memory()
        # Noise of the int8 store's stochastic rounding, reseeded per round (see _reseed_rounding).
        self._round_gen = torch.Generator(device=self.device)
        self.labels = labels.to(self.device, torch.int64)  # [N]
        self.mask = None  # SALM: bool [N, 1, H, W] of the pixels allowed to move, made before the first poison pass
        if method.whole_set_loss() and (method.classwise or method.training_free):
            raise ValueError(f"a whole-set loss needs per-sample perturbations from a surrogate; method "
                             f"{method.name!r} is {'class-wise' if method.classwise else 'training-free'}")
        if self.cfg.sparse is not None and (method.classwise or method.training_free):
            raise ValueError(f"sparse (SALM) needs per-sample perturbations from a surrogate; method "
                             f"{method.name!r} is {'class-wise' if method.classwise else 'training-free'}")
        self.model = self.forward = self.optimizer = None  # training-free methods need no surrogate
        if not method.training_free:
            torch.manual_seed(self.cfg.seed)  # model initialisation
            self.image_size = max(h, w)
            self.model = build_model(self.cfg.arch, num_classes, image_size=self.image_size).to(self.device)
            if self.device.type == "cuda":
                self.model = self.model.to(memory_format=torch.channels_last)
            # The surrogate as called in the loops: torch.compile'd on request ("reduce-overhead"
            # adds CUDA graphs on CUDA). Parameters and state_dict stay those of self.model.
            self.forward = _compiled(self.model, compile)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                             weight_decay=self.cfg.weight_decay)
        self.gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)  # shuffles and flips
        self.history: list[dict] = []
        self.epoch = 0  # rounds done
        self.pre_epoch = 0  # clean pre-training epochs done
        self.done = False  # the method ended the run early

    # -- state ---------------------------------------------------------------------------
    def _state(self) -> dict:
        return dict(
            epoch=self.epoch, method=self.method.name, config=self.cfg.to_dict(), fingerprint=self.fingerprint,
            model=self.model.state_dict() if self.model is not None else {},
            optimizer=self.optimizer.state_dict() if self.optimizer is not None else {},
            delta=self.delta.cpu(), generator=self.gen.get_state(), history=self.history,
            pre_epoch=self.pre_epoch, done=self.done,
            **({"mask": self.mask.cpu()} if self.mask is not None else {}),
        )

    def load(self, state: dict) -> None:
        if state["method"] != self.method.name:
            raise ValueError(f"checkpoint is of method {state['method']!r}, not {self.method.name!r}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("checkpoint was made from other images or labels; start anew with --overwrite")
        mine = self.cfg.to_dict()
        # Every setting, epochs included: the schedules depend on E, so a changed setting
        # could not reach the result of any uninterrupted run.
        diff = {k: (state["config"].get(k), v) for k, v in mine.items() if state["config"].get(k) != v}
        if diff:
            raise ValueError(f"checkpoint settings differ from this run's: {diff} (as (checkpoint, now))")
        if self.model is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if state["delta"].dtype != self.delta.dtype:
            # Only "auto" can differ (the config matched): keep the checkpoint's store dtype,
            # so the resumed run continues the same arithmetic.
            pin = self.delta.is_pinned()
            self.delta = torch.empty_like(self.delta, dtype=state["delta"].dtype)
            if pin:
                self.delta = self.delta.pin_memory()
        self.delta.copy_(state["delta"])
        self.gen.set_state(state["generator"])
        self.history = list(state["history"])
        self.epoch = int(state["epoch"])
        self.pre_epoch = int(state.get("pre_epoch", 0))
        self.done = bool(state.get("done", False))
        if "mask" in state:
            self.mask = state["mask"].to(self.store)

    # -- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunResult:
        resumed_from = 0
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load(load_checkpoint(self.checkpoint_path))
            resumed_from = self.epoch
        if self.method.training_free:
            return self._run_training_free(resumed_from)
        self._pretrain()
        bar = _progress(self.cfg.epochs, f"{self.method.name} outer epochs", "epoch", initial=self.epoch,
                        enabled=self.progress, interval=0)
        try:
            while self.epoch < self.cfg.epochs and not self.done:
                e = self.epoch + 1
                with self._maybe_trace():
                    t0 = time.perf_counter()
                    k = self.method.retrain_epochs()
                    train = self._retrain(e, k) if k else \
                        self._train_epoch(e, self.cfg.learning_rate(e), self.method.train_batches(e))
                    t1 = time.perf_counter()
                    if self.cfg.sparse is not None and self.mask is None:
                        with self.timer("saliency"):
                            self.mask = self._saliency_mask()
                    poison = self._poison_epoch(e)
                    t2 = time.perf_counter()
                stats = dict(epoch=e, lr=self.cfg.learning_rate(e), step_size=self.cfg.step_size(e),
                             **train, **poison, train_s=t1 - t0, poison_s=t2 - t1,
                             images_per_s=self.n / max(t2 - t0, 1e-9))
                with self.timer("stopping criterion"):
                    self.done = bool(self.method.finished(self, stats))
                stats["finished"] = self.done
                self.history.append(stats)
                self.epoch = e
                self._checkpoint()
                bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("train_acc", "poison_loss", "images_per_s")
                                 if stats.get(k) is not None})
                bar.update(1)
        finally:
            bar.close()
        return RunResult(delta=self._result_delta(), history=self.history, timings=dict(self.timer.total),
                         resumed_from=resumed_from)

    def _result_delta(self) -> torch.Tensor:
        """Per-sample perturbations [N, 3, H, W], float32 in pixel units, on the CPU (class-wise ones expanded)."""
        d = self.delta.cpu()
        d = d.float().div_(255) if d.dtype == torch.int8 else d.float()
        return d[self.labels.cpu()] if self.method.classwise else d

    def _checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            with self.timer("checkpoint"):
                save_checkpoint(self.checkpoint_path, self._state())

    def _pretrain(self) -> None:
        """The method's clean surrogate epochs before round 1, checkpointed after each."""
        total = self.method.pretrain_epochs()
        if self.pre_epoch >= total:
            return
        bar = _progress(total, f"{self.method.name} clean surrogate", "epoch", initial=self.pre_epoch,
                        enabled=self.progress, interval=0)
        try:
            while self.pre_epoch < total:
                e = self.pre_epoch + 1
                t0 = time.perf_counter()
                train = self._train_epoch(e, self.method.pretrain_lr(e), None, clean=True)
                self.history.append(dict(pretrain_epoch=e, lr=self.method.pretrain_lr(e), **train,
                                         train_s=time.perf_counter() - t0))
                self.pre_epoch = e
                self._checkpoint()
                bar.set_postfix(train_acc=f"{train['train_acc']:.3f}")
                bar.update(1)
        finally:
            bar.close()

    def _fresh_surrogate(self, epoch: int) -> None:
        """Re-initialise the surrogate's weights (seeded by the run's seed and ``epoch``, so a
        resumed run draws the same ones) and clear the optimizer's momentum."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1_000_003 * epoch)
            fresh = build_model(self.cfg.arch, self.num_classes, image_size=self.image_size)
        self.model.load_state_dict(fresh.state_dict())  # in place: the compiled handle stays valid
        self.optimizer.state.clear()

    def _retrain(self, epoch: int, epochs: int) -> dict:
        """Round ``epoch``'s surrogate: fresh weights, ``epochs`` epochs on x + delta, lr cosine to 0."""
        self._fresh_surrogate(epoch)
        for k in range(epochs):
            train = self._train_epoch(epoch, self.cfg.lr * 0.5 * (1 + math.cos(math.pi * k / epochs)), None,
                                      stage=f"fresh surrogate {k + 1}/{epochs}")
        return train

    def _run_training_free(self, resumed_from: int) -> RunResult:
        if self.epoch == 0:
            t0 = time.perf_counter()
            with self.timer("generation"):
                d = self.method.generate(self.images.to(self.device), self.labels, self.gen, self.device)
                d = d.clamp(-self.cfg.eps, self.cfg.eps)
            self._reseed_rounding(1)
            self._store_delta(torch.arange(self.n), d)
            self.history.append(dict(epoch=1, train_s=0.0, poison_s=time.perf_counter() - t0,
                                     images_per_s=self.n / max(time.perf_counter() - t0, 1e-9)))
            self.epoch = 1
            self._checkpoint()
        return RunResult(delta=self._result_delta(), history=self.history, timings=dict(self.timer.total),
                         resumed_from=resumed_from)

    @contextlib.contextmanager
    def _maybe_trace(self):
        """Record the first outer epoch of this call with torch.profiler (Chrome trace JSON)."""
        if self.trace_path is None:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            yield
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))
        self.trace_path = None

    def _bar(self, desc: str, total: int | None = None):
        """A per-stage bar counting images (rate in images/s, with ETA)."""
        return _progress(self.n if total is None else total, desc, "img", enabled=self.progress, leave=False,
                         unit_scale=True)

    def _batch(self, idx: torch.Tensor):
        """Clean images of a batch as float in [0, 1], flipped per sample with post-augmentation."""
        x = self.images[idx.to(self.store)].to(self.device, non_blocking=True).float().div_(255)  # [B, 3, H, W]
        if self.cfg.post_aug:
            flip = (torch.rand(len(idx), generator=self.gen) < 0.5).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _delta(self, idx: torch.Tensor) -> torch.Tensor:
        """Perturbations of samples ``idx`` [B, 3, H, W] (class-wise: of their classes) as a new float32 tensor."""
        rows = self.labels[idx] if self.method.classwise else idx
        d = self.delta[rows.to(self.store)].to(self.device, non_blocking=True)  # indexing copies
        return d.float().div_(255) if d.dtype == torch.int8 else d.float()

    def _class_delta(self) -> torch.Tensor:
        """Class-wise perturbations [C, 3, H, W] as a new float32 tensor on the device."""
        d = self.delta.to(self.device)
        return d.float().div(255) if d.dtype == torch.int8 else d.to(torch.float32, copy=True)

    def _reseed_rounding(self, epoch: int) -> None:
        """Seed the int8 store's rounding noise from the run's seed and the round, so a run
        resumed at a round boundary draws the same noise."""
        self._round_gen.manual_seed((self.cfg.seed * 1_000_003 + epoch) % (2**63))

    def _store_delta(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Write perturbations of rows ``idx`` of the store (samples, or classes when class-wise).

        float16 rounds to nearest. int8 holds whole grey levels: ``floor(255 delta + u)``, u
        uniform in [0, 1), rounds up with probability equal to the fraction, so steps far below
        one grey level still move delta in expectation (round-to-nearest would undo every net
        move under 0.5/255 after each pass). Bounds hold: an integer bound is never crossed.
        """
        if self.delta.dtype == torch.int8:
            v = delta.float() * 255
            u = torch.rand(v.shape, generator=self._round_gen, device=v.device)
            lim = math.floor(self.cfg.eps * 255 + 1e-6)
            delta = v.add_(u).floor_().clamp_(-lim, lim)
        self.delta[idx.to(self.store)] = delta.to(self.store, self.delta.dtype)

    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_epoch(self, epoch: int, lr: float, max_batches: int | None, clean: bool = False,
                     stage: str = "surrogate") -> dict:
        """Surrogate training on x + delta (``clean``: on x) for one epoch or ``max_batches`` batches."""
        cfg = self.cfg
        if max_batches == 0:
            return dict(train_loss=None, train_acc=None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        perm = torch.randperm(self.n, generator=self.gen).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        batches = [perm[i:i + cfg.batch_size] for i in range(0, self.n, cfg.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:  # batch norm cannot train on one sample
            batches[-2] = torch.cat(batches[-2:])
            batches.pop()
        if max_batches is not None:
            batches = batches[:max_batches]
        bar = self._bar(f"epoch {epoch}: {stage}", total=sum(len(b) for b in batches))
        for idx in batches:
            with self.timer("data"):
                x = self._batch(idx)
                y = self.labels[idx]
                if not clean:
                    x = self.method.train_input(self, x, self._delta(idx), y)
            with self.timer("surrogate training"):
                with self._autocast():
                    _, logits = self.forward(x)
                    loss = F.cross_entropy(logits.float(), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == y).sum()
                seen += len(idx)
            bar.update(len(idx))
        bar.close()
        return dict(train_loss=float(loss_sum) / seen, train_acc=float(correct) / seen)

    def _poison_epoch(self, epoch: int) -> dict:
        self._reseed_rounding(epoch)
        if self.method.whole_set_loss():
            return self._poison_epoch_whole_set(epoch)
        cfg, method = self.cfg, self.method
        alpha = cfg.step_size(epoch)
        self.model.eval()
        self.model.requires_grad_(False)
        perm = torch.randperm(self.n, generator=self.gen).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        batches = [perm[i:i + cfg.poison_batch_size] for i in range(0, self.n, cfg.poison_batch_size)]
        if method.classwise:
            leaf = self._class_delta()  # [C, 3, H, W]; its gradient sums over each class's samples
            # The pixel-range clip cannot apply to a perturbation shared by many images:
            # against a clean value of 0.5 it is a no-op, and protect() clips each image.
            mid = torch.full_like(leaf, 0.5)
        bar = self._bar(f"epoch {epoch}: PGD x{cfg.pgd_steps}")
        try:
            for idx in batches:
                with self.timer("data"):
                    x = self._batch(idx)
                    y = self.labels[idx]
                    if not method.classwise:
                        leaf = self._delta(idx)
                    mask = None if self.mask is None else self.mask[idx.to(self.store)].to(self.device)
                for _ in range(cfg.pgd_steps):
                    leaf.requires_grad_(True)
                    delta = leaf[y] if method.classwise else leaf  # [B, 3, H, W]
                    with self.timer("forward"), self._autocast():
                        features, logits = self.forward(method.poison_input(self, x, delta, y))
                    with self.timer("loss"):
                        loss = method.poison_loss(features, logits, y)
                    with self.timer("backward"):
                        (grad,) = torch.autograd.grad(loss, leaf)
                    with self.timer("step"):
                        leaf = leaf.detach()
                        pgd_step_(leaf, grad, mid if method.classwise else x, eps=cfg.eps, step_size=alpha,
                                  maximize=method.maximize, mask=mask)
                loss_sum += loss.detach() * len(idx)
                if not method.classwise:
                    with self.timer("step"):
                        self._store_delta(idx, leaf)
                bar.update(len(idx))
            if method.classwise:
                self._store_delta(torch.arange(self.num_classes), leaf)
        finally:
            bar.close()
            self.model.requires_grad_(True)
        return dict(poison_loss=float(loss_sum) / self.n)

    def _poison_epoch_whole_set(self, epoch: int) -> dict:
        """``pgd_steps`` steps on one loss of all N samples' features.

        Per step: the features of every batch without a graph ([N, F] on the device), the
        loss and its gradient w.r.t. them, then per batch the features again with a graph,
        back-propagated with that gradient to the batch's perturbation, which takes its
        step. The surrogate is in eval mode, so a sample's features do not depend on its
        batch and both passes agree. Memory: [N, F] features plus one batch's graph.
        """
        cfg, method = self.cfg, self.method
        alpha = cfg.step_size(epoch)
        self.model.eval()
        self.model.requires_grad_(False)
        batches = [torch.arange(i, min(i + cfg.poison_batch_size, self.n), device=self.device)
                   for i in range(0, self.n, cfg.poison_batch_size)]
        bar = self._bar(f"epoch {epoch}: PGD x{cfg.pgd_steps} (whole set)", total=2 * self.n * cfg.pgd_steps)
        try:
            for _ in range(cfg.pgd_steps):
                parts = []
                for idx in batches:
                    with self.timer("data"):
                        x, y = self._batch(idx), self.labels[idx]
                    with self.timer("forward"), torch.no_grad(), self._autocast():
                        parts.append(self.forward(method.poison_input(self, x, self._delta(idx), y))[0].float())
                    bar.update(len(idx))
                with self.timer("loss"):
                    features = torch.cat(parts).requires_grad_(True)
                    del parts
                    loss = method.poison_loss(features, None, self.labels)
                    (grad_features,) = torch.autograd.grad(loss, features)
                    del features
                for idx in batches:
                    with self.timer("data"):
                        x, y = self._batch(idx), self.labels[idx]
                        leaf = self._delta(idx).requires_grad_(True)
                        mask = None if self.mask is None else self.mask[idx.to(self.store)].to(self.device)
                    with self.timer("forward"), self._autocast():
                        f = self.forward(method.poison_input(self, x, leaf, y))[0]
                    with self.timer("backward"):
                        (grad,) = torch.autograd.grad(f.float(), leaf, grad_outputs=grad_features[idx])
                    with self.timer("step"):
                        leaf = leaf.detach()
                        pgd_step_(leaf, grad, x, eps=cfg.eps, step_size=alpha, maximize=method.maximize, mask=mask)
                        self._store_delta(idx, leaf)
                    bar.update(len(idx))
        finally:
            bar.close()
            self.model.requires_grad_(True)
        return dict(poison_loss=float(loss.detach()))

    def _saliency_mask(self) -> torch.Tensor:
        """SALM: bool [N, 1, H, W], True at the ``sparse`` % pixels of largest input-gradient magnitude."""
        from .methods.salm import saliency_mask

        self.model.eval()
        self.model.requires_grad_(False)
        try:
            masks = []
            for i in range(0, self.n, self.cfg.poison_batch_size):
                idx = torch.arange(i, min(i + self.cfg.poison_batch_size, self.n))
                x = self.images[idx.to(self.store)].to(self.device).float().div_(255)
                with self._autocast():
                    masks.append(saliency_mask(self.forward, x, self.labels[idx.to(self.device)], self.cfg.sparse))
            return torch.cat(masks).to(self.store)
        finally:
            self.model.requires_grad_(True)

    @torch.no_grad()
    def accuracy_on_poisoned(self, batch_size: int | None = None) -> float:
        """The surrogate's accuracy on x + delta over the whole set (eval mode, no augmentation)."""
        self.model.eval()
        bs = batch_size or self.cfg.poison_batch_size
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for i in range(0, self.n, bs):
            idx = torch.arange(i, min(i + bs, self.n), device=self.device)
            x = self.images[idx.to(self.store)].to(self.device).float().div_(255)
            x = (x + self._delta(idx)).clamp_(0, 1)
            with self._autocast():
                _, logits = self.forward(x)
            correct += (logits.argmax(1) == self.labels[idx]).sum()
        return float(correct) / self.n
