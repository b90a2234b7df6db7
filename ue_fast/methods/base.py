"""The two kinds of generator, over the blocks of ``ue_fast.generation``.

A generator is a class with a ``name``, a ``config_class`` (its algorithm settings,
``ue_fast.methods.settings``), ``presets`` and ``stages()``: the steps the runner
runs, checkpoints and resumes. It never reaches into the runner; the runner never
names it.

- :class:`SurrogateMethod`: optimised against a surrogate network. ``setup`` builds
  the blocks every such method uses: ``self.data`` (the images, labels and the seeded
  generator), ``self.store`` (the perturbations: one per sample, or one per class with
  ``classwise``), ``self.surrogate`` (network, SGD, ``fit``) and ``self.pgd`` (the
  passes). A method's ``stages()`` and round functions then read like its paper's
  algorithm box.
- :class:`TrainingFreeMethod`: draws or searches its perturbations directly
  (``generate``); no surrogate settings.

Adding a method: a file with its config, its class and its ``stages()``, and a line
in ``ue_fast.methods.METHODS``.
"""
from __future__ import annotations

import time

import torch

from ..generation import PGD, Batches, PerturbationStore, RunContext, Stage, Surrogate
from ..generation.placement import check_delta_dtype, choose_store
from .settings import Config, SurrogateConfig


class Method:
    """What every generator shares: its settings, presets and checkpointed state."""

    name = "base"
    config_class = Config
    classwise = False  # one perturbation per class (the output's rounding is then shared per class)
    streams = True  # runs with its images and perturbations on disk, streamed by batches
    distributed = False  # runs under torchrun (its draws and losses split over processes)
    distributed_why = "its random draws and losses are not split over processes"  # why not, when it does not
    streams_why = ""  # why not, when it does not
    lp = True  # the output is x + delta with |delta|_inf <= eps; False: the method's own change (see budget())
    keyed = False  # its seed is a private key: drawn at random unless given, kept out of the outputs
    # Named settings over the defaults: "paper" is the defaults; "cpu-small" a CPU-sized schedule.
    presets: dict[str, dict] = {"paper": {}, "cpu-small": {}}

    def __init__(self, config: Config | None = None, num_classes: int | None = None):
        self.config = config if config is not None else self.config_class()
        self.num_classes = num_classes

    @classmethod
    def preset(cls, name: str) -> dict:
        if name not in cls.presets:
            raise ValueError(f"method {cls.name!r} has no preset {name!r}; its presets: {sorted(cls.presets)}")
        return dict(cls.presets[name])

    def settings(self) -> dict:
        """Everything that decides the result (checked on resume, written to the manifest)."""
        return self.config.to_dict()

    def setup(self, ctx: RunContext, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        raise NotImplementedError

    def budget(self) -> dict:
        """What bounds the change, for the manifest: the L-inf ball of ``eps`` here; a method
        that is not an L_p perturbation (``lp = False``) describes and checks its own."""
        return {"kind": "linf", "eps_255": round(self.config.eps * 255, 6)}

    def key(self) -> dict:
        """A keyed method's private key (what regenerates its output), for ``protect(key_file=...)``."""
        raise NotImplementedError(f"method {self.name!r} has no private key")

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def blocks(self) -> dict:
        """The blocks whose ``state_dict`` a checkpoint holds."""
        return {"data": self.data, "store": self.store}

    def extra_state(self) -> dict:
        """The method's own state beyond its blocks' (tensors, numbers, lists)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {**{k: b.state_dict() for k, b in self.blocks().items()}, "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        for k, b in self.blocks().items():
            b.load_state_dict(state[k])
        self.load_extra_state(state["extra"])

    def perturbations(self) -> torch.Tensor:
        """float32 [N, 3, H, W] in pixel units on the CPU."""
        return self.store.per_sample_cpu()

    def read_perturbations(self, start: int, stop: int) -> torch.Tensor:
        """float32 [stop - start, 3, H, W] in pixel units on the CPU: those of samples start..stop-1."""
        return self.store.read_samples(start, stop)

    def _data_and_store(self, ctx, images, labels, num_classes):
        cfg = self.config
        check_delta_dtype(ctx.delta_dtype, cfg.eps)
        self.ctx, self.num_classes = ctx, num_classes
        n, c, h, w = images.shape
        if ctx.dist is not None:
            if not self.distributed:
                raise ValueError(f"method {self.name!r} does not run under torchrun yet ({self.distributed_why}); "
                                 "run it in one process")
            lo, hi = ctx.dist.shard(n)
            n = hi - lo  # this process's shard
        rows = num_classes if self.classwise else n
        where = choose_store(ctx.device, n * c * h * w, rows * c * h * w, ctx.delta_dtype, store=ctx.store,
                             memory_budget=ctx.memory_budget, small_delta=self.classwise)
        if "disk" in (where.images, where.delta) and not self.streams:
            raise ValueError(f"method {self.name!r} needs its images and perturbations in memory "
                             f"({self.streams_why}); run it with --store memory"
                             + ("" if ctx.store == "disk" else " (they exceed the memory budget: raise "
                                "--memory-budget if the host has the memory)"))
        self.placement = where
        self.data = Batches(images, labels, ctx.device, where.images, cfg.seed, images_file=ctx.images_file,
                            work_dir=ctx.work_dir, dist=ctx.dist, dtype=ctx.dtype)
        self.store = PerturbationStore(rows, (c, h, w), device=ctx.device, place=where.delta, dtype=where.dtype,
                                       eps=cfg.eps, seed=cfg.seed, row_of=self.data.labels if self.classwise else None,
                                       work_dir=ctx.work_dir,
                                       name="delta" if ctx.dist is None else f"delta.rank{ctx.dist.rank}")
        self.data.store = self.store


class SurrogateMethod(Method):
    """A generator optimised against a surrogate (see the module docstring)."""

    config_class = SurrogateConfig

    def setup(self, ctx, images, labels, num_classes):
        cfg = self.config
        self._data_and_store(ctx, images, labels, num_classes)
        self.surrogate = Surrogate(ctx, cfg.arch, num_classes, max(images.shape[2:]), seed=cfg.seed, lr=cfg.lr,
                                   momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        self.pgd = PGD(ctx, self.surrogate, self.data, self.store, cfg.eps)

    def blocks(self) -> dict:
        return {**super().blocks(), "surrogate": self.surrogate, "pgd": self.pgd}

    # -- inputs of surrogate training, per index batch -------------------------------------
    def clean_inputs(self, transform=None):
        """idx -> (x, y) (``transform(x, y)`` applied when given)."""
        def inputs(idx):
            x, y = self.data.clean(idx), self.data.labels[idx]
            return (x if transform is None else transform(x, y)), y
        return inputs

    def perturbed_inputs(self, flip: bool = False, transform=None):
        """idx -> (x + delta, y), x flipped at random with ``flip`` (post-augmentation), then
        ``transform(x + delta, y)`` when given."""
        def inputs(idx):
            x, y = self.data.clean(idx, flip), self.data.labels[idx]
            xd = x + self.store.samples(idx)
            return (xd if transform is None else transform(xd, y)), y
        return inputs

    def poisoned_accuracy(self) -> float:
        """The surrogate's accuracy on clip(x + delta, 0, 1) over the whole set (eval mode, no augmentation)."""
        def inputs(idx):
            x = self.data.clean(idx)
            return (x + self.store.samples(idx)).clamp_(0, 1), self.data.labels[idx]
        return self.surrogate.accuracy(self.data.ordered(self.config.poison_batch_size), inputs)


class TrainingFreeMethod(Method):
    """A generator with no surrogate, in two parts: :meth:`begin` makes what the whole set
    shares (class patterns, a search over chunks of the images), then :meth:`rows` the
    perturbations of consecutive chunks of images, drawing their per-sample noise from the
    run's generator in order. Chunks are a multiple of 16 rows (torch draws normal noise in
    blocks of 16 values), so the draws, and the result, are those of one call on the whole
    set, in memory or streamed from disk."""

    distributed_why = "it has no surrogate to train: nothing to split"

    def setup(self, ctx, images, labels, num_classes):
        self.shape = tuple(images.shape)
        self._data_and_store(ctx, images, labels, num_classes)

    def stages(self):
        return [Stage("generation", 1, self._generation)]

    def chunk(self) -> int:
        """Rows per chunk: a multiple of 16, about 4 M noise values (AR's canvas is the largest)."""
        _, c, h, w = self.shape
        return max(16, (2 ** 22 // (c * (h + 4) * (w + 4))) // 16 * 16)

    def _chunks(self):
        data, step = self.data, self.chunk()
        for s in range(0, data.local_n, step):
            yield s, data.read(s, min(s + step, data.local_n)), data.labels[s:s + step]

    def _generation(self, i: int) -> dict:
        t0 = time.perf_counter()
        device, gen = self.ctx.device, self.data.gen
        bar = self.ctx.bar(self.data.local_n, f"{self.name}: generation")
        with self.ctx.timer("generation"):
            self.begin(lambda: ((x, y) for _, x, y in self._chunks()), gen, device)
            self.store.begin_pass()
            for s, x, y in self._chunks():
                d = self.rows(x.to(device), y, gen, device).clamp_(-self.config.eps, self.config.eps)
                self.store.put(torch.arange(s, s + len(y)), d)
                bar.update(len(y))
        bar.close()
        return dict(train_s=0.0, poison_s=time.perf_counter() - t0)

    def begin(self, chunks, gen: torch.Generator, device: torch.device) -> None:
        """What every chunk shares; ``chunks()`` iterates (uint8 images, labels) over the whole set."""

    def rows(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
             device: torch.device) -> torch.Tensor:
        """float perturbations [B, 3, H, W] (clipped to eps afterwards) of uint8 images [B, 3, H, W]
        on ``device``, the set's next rows after :meth:`begin`."""
        raise NotImplementedError

    def generate(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                 device: torch.device) -> torch.Tensor:
        """Every perturbation of ``images`` at once (:meth:`begin`, then :meth:`rows` of all of them)."""
        self.shape = tuple(images.shape)
        self.begin(lambda: [(images, labels)], gen, device)
        return self.rows(images, labels, gen, device)


class MethodWrapper:
    """A method run unchanged but for what a wrapper sets up around it (``Sparse``, ``Robust``):
    everything the runner and ``protect`` read of a method is the wrapped one's, except what a
    subclass overrides (its ``settings``, ``budget``, ``setup``)."""

    def __init__(self, method):
        self.method = method
        self.name, self.config, self.classwise = method.name, method.config, method.classwise

    def settings(self) -> dict:
        return self.method.settings()

    def budget(self) -> dict:
        return self.method.budget()

    def setup(self, ctx, images, labels, num_classes) -> None:
        self.method.setup(ctx, images, labels, num_classes)

    def stages(self):
        return self.method.stages()

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state)

    def perturbations(self):
        return self.method.perturbations()

    def read_perturbations(self, start: int, stop: int):
        return self.method.read_perturbations(start, stop)

    @property
    def store(self):
        return self.method.store

    @property
    def data(self):
        return self.method.data
