"""``protect``: read an image folder or data set, generate the perturbations, write the protected copy.

A pipeline: check the arguments, open the source (``ue_fast.data.sources``: an image
folder, a field's distribution, arrays, WebDataset, Parquet, LMDB), run the method's
stages (``ue_fast.generation.Runner``), hand the rounded rows to the sinks
(``ue_fast.data.sinks``: the PNG tree or the input's format, the perturbation ``.npy``,
``poison.pt``, ``poison_classwise.pt``; each file there says what it writes), then write
``manifest.json``, last: its presence marks a complete output. Every output follows the
data set's order (the manifest's ``dataset`` and ``files``) and is written by chunks of
rows, so memory stays bounded whatever N.

While running, ``OUTPUT_DIR/.ue_fast/`` holds the ingested images (``images.npy``,
reused by ``resume``), a disk store's files, and ``checkpoint.pt``, the state after a
step of the method's stages (once ``checkpoint_every`` seconds have passed; ``resume=True``
continues from it); it is removed when the run completes. A keyed method (``cuda``) has
its seed as a private key, recorded in no output and written only to ``key_file``.
Images the output leaves unchanged are counted in the manifest and warned about
(:class:`UnchangedImagesWarning`). The outputs in full: ``docs/protect.md``.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path


from .checkpoint import CHECKPOINT_EVERY
from .data import ImageSet
from .data.exports import write_json_atomic
from .data.scan import describe_left_out
from .data.ingest import default_workers
from .data.png import PNG_LEVEL, check_png_level
from .data.canonical import detect
from .data.sinks import sinks_for
from .data.sinks.apbench import apbench_key
from .data.sinks.poison_pt import POISON_PT_MODES
from .data.sinks.rounding import ROUNDINGS, quantize  # noqa: F401 (quantize: public here too)
from .data.sinks.write import output_step, planned_files, write_outputs
from .data.sources import find_source
from .devices import resolve_device
from .generation import COMPILE_MODES, Runner
from .generation.distributed import env_world_size, from_env
from .generation.placement import check_store, parse_size
from .methods import METHODS, SurrogateMethod
from .methods.build import build_generator
from .models import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from .progress import note
from .manifest import _manifest, _unchanged_message
from .run_folder import (
    CHECKPOINT_DIR,
    OUTPUTS_FILE,
    _check_dirs,
    _output_run,
    _readable_write_errors,
)


class UnchangedImagesWarning(UserWarning):
    """Some protected images are identical to their inputs: they carry no protection."""


class LeftOutWarning(UserWarning):
    """Files of the input were not protected (hidden, not in a class folder, not images, only
    a first frame, unreadable and skipped): the manifest's ``ignored`` and ``skipped`` list them."""


def _check_resize_for(method: str, resize) -> None:
    """A surrogate-based method trains networks that take 16..1024 px: refuse other sizes before
    anything is read."""
    from .data.decode import _check_resize

    h, w = _check_resize(resize)
    if issubclass(METHODS[method], SurrogateMethod) and not (MIN_IMAGE_SIZE <= min(h, w) and
                                                             max(h, w) <= MAX_IMAGE_SIZE):
        raise ValueError(f"resize {h}x{w}: method {method!r} trains a network on the images, which takes "
                         f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels a side")


def protect(source, output_dir, *, method: str = "miue", eps: float | None = None, epochs: int | None = None,
            pgd_steps: int | None = None, arch: str | None = None, loss: str | None = None,
            batch_size: int | None = None, poison_batch_size: int | None = None, seed: int | None = None,
            device: str | None = None, resize=None, skip_bad: bool = False, resume: bool = False,
            overwrite: bool = False, progress: bool = True, profile: bool = False,
            keep_checkpoint: bool = False, compile: bool | str = False, sparse: float | None = None,
            rounding: str = "stochastic", preset: str | None = None, delta_dtype: str = "auto",
            store: str = "auto", memory_budget=None, workers: int | None = None, sync_bn: bool = False,
            float64: bool = False, order=None, split: str = "train", key_file=None, output_format: str = "png",
            image_key: str | None = None, label_key: str | None = None, png_compression: int = PNG_LEVEL,
            checkpoint_every: float = CHECKPOINT_EVERY, poison_pt: str = "auto", robust=None, robust_settings: dict | None = None,
            **settings) -> dict:
    """Protect an image folder (or arrays) with ``method``; write the outputs; return the manifest.

    Args:
        source: a folder of class sub-folders of images; a data set in its authors'
            distribution, read in its own index order (``cifar-10-batches-py/``,
            ``cifar-100-python/``, an SVHN ``.mat``, a ``.npz`` with ``x`` and ``y``: see
            ``ue_fast.data.canonical``); or a tuple ``(images, labels)`` or ``(images, labels,
            classes)`` of arrays (see ``ue_fast.data.images_from_arrays``). Every output
            (``poison.pt``, the ``.npy``, the manifest's ``files``) follows the data set's order.
        order: for a folder source, a text file (or list) of its images' relative paths, one
            per line: the data set's order, used for every output instead of the sorted one.
        split: which split of a CIFAR or SVHN distribution to protect ("train", "test",
            "extra" for SVHN); a single ``.mat``/``.npz`` file is its own split.
        output_dir: where the protected copy goes; must be empty unless ``overwrite``
            (which deletes it first) or ``resume``, and then must be an earlier ue_fast
            output (its manifest.json or work folder present): anything else is refused.
        eps: the L-inf budget in units of 1/255, in (0, 255] (8 means 8/255); None: the
            method's default (8 for the optimised methods, 255 for the one-pixel ``ops``).
        epochs, pgd_steps, arch, loss, batch_size, poison_batch_size, seed: the method's
            main settings (None keeps the method's default); further settings of the
            method's config class (for MI-UE ``MIUEConfig``: ``alpha``, ``post_aug``, ...)
            as keywords.
        preset: a named set of the method's settings applied before the ones given here:
            "paper" (the defaults) or "cpu-small" (a CPU-sized schedule); see
            ``METHODS[method].presets``.
        delta_dtype: how the perturbation is kept between passes: "auto" (float32, float16
            when float32 does not fit the memory budget), "float32", "float16" or "int8"
            (whole grey levels, rounded stochastically after every pass).
        store: where images and perturbations live while generating: "memory" (the device,
            or host memory), "disk" (files in ``output_dir/.ue_fast``, streamed by batches:
            memory stays flat whatever N) or "auto" (memory while images + perturbations fit
            ``memory_budget``, else disk).
        memory_budget: host bytes (an int, or "8G", "500M") that images plus perturbations
            may take in memory, and that ``poison.pt`` may take to be written; default half
            of the host memory available at the start.
        workers: processes decoding the input folder (default: the CPUs, at most 16).
        sync_bn: under torchrun, batch norm takes its training statistics over the global batch
            (then the run matches one process's to float tolerance; see ``ue_fast.generation.distributed``).
        float64: compute images, the surrogate and the losses in double precision (slower:
            2x on a CPU, far more on GPUs; no bf16 autocast): for checking that a torchrun
            run gives one process's result, which float32 rounding, amplified by SGD, blurs.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this with the same arguments:
    each owns a shard of the images and perturbations, ``batch_size`` and
    ``poison_batch_size`` are global batches split over the processes, rank 0 writes the
    outputs and the manifest, and every process returns the manifest.
        robust: defences the protection must survive (``["jpeg", "grayscale"]`` or
            ``"jpeg,grayscale"``; those with a differentiable form: jpeg, grayscale, bdr): the
            perturbation is optimised through them (``ue_fast.methods.robust``; surrogate
            methods but sep; None: plain). Experimental: at CPU scale it kept less than half of a
            protection's gap under JPEG-10 and grayscale, at a cost to the gap without a
            defence (docs/methods.md).
        robust_settings: how robust draws the defences, e.g. ``{"share": 0.5, "surrogate": False,
            "jpeg_quality": (10, 30)}`` (``ue_fast.generation.defended.RobustSettings``).
        sparse: SALM: perturb only this percentage (0, 100] of each image's most salient
            pixels (surrogate input-gradient magnitude), for any surrogate-based method.
        device: "cpu", "cuda" or "cuda:N"; default CUDA when available.
        resize: an int or (H, W): resize every input image; needed for mixed sizes.
        skip_bad: skip unreadable images (listed in the manifest) instead of failing.
        resume: continue from the checkpoint in ``output_dir`` if there is one.
        progress: show progress bars.
        profile: synchronise at every stage to time it (slower), report the breakdown, and
            write a torch.profiler trace of the first round to
            ``output_dir/profile_trace.json`` (open it in chrome://tracing or Perfetto).
        keep_checkpoint: keep the work folder ``.ue_fast/`` (the checkpoint, the ingested
            images, a disk store's files) after a complete run.
        compile: run the surrogate through ``torch.compile``: True or "default",
            "reduce-overhead" (adds CUDA graphs on CUDA) or "max-autotune". The first
            round pays the compilation; it does not change the algorithm.
        rounding: how the 8-bit output rounds ``255 (x + delta)``: "stochastic" (default;
            unbiased, seeded by ``seed``) or "nearest" (drops any perturbation under half a
            grey level).
        output_format: how the protected images are written: "png" (default: the PNG tree),
            "webdataset" (shards with the input's names, keys and non-image members, each image as
            ``<key>.png``; a WebDataset input only) or "parquet" (the input table's files, columns
            and schema, each image as PNG bytes; a Parquet or ``datasets`` input only) or "apbench"
            (APBench's ``<method>_poisons/<key>/data/<i>.png`` and its ``index.json``; a CIFAR-10,
            CIFAR-100 or SVHN training set read from its own files only). A lossy format (JPEG) is refused: its
            compression is itself a defence that strips the perturbation. The perturbation
            files (.npy, poison.pt) are written either way.
        checkpoint_every: seconds between checkpoints (default ``CHECKPOINT_EVERY``, 60): a
            checkpoint is written after a step (a round, an epoch, a restart) once that long has
            passed since the last one or the start, so a crash loses at most that much work; 0
            writes one after every step. A resume is exact from whichever checkpoint exists.
            Every checkpoint writes the whole perturbation store (0.9 s for CIFAR-10's 50,000
            images, 3.5 s for 2,000 at 224 px on a 2-core CPU); after every step of a fast
            method that cost more than the method (PIL on CIFAR-10: 27 s of checkpoints for
            24 s of generation), while once a minute costs at most a few percent.
        png_compression: zlib's level 0-9 of every PNG written (default 1: 1.3-1.4x faster to
            encode than Pillow's default 6, files up to 10% larger; the pixels are the same at every
            level). The images are encoded by ``workers`` threads.
        poison_pt: "auto" (default): write ``poison.pt`` (float32, 4 bytes a pixel) when it holds at
            most ``POISON_PT_AUTO`` (1 GiB: CIFAR-10, CIFAR-100 and SVHN whole, the sets the MI-UE and
            EM scripts that read it evaluate) and fits the memory budget; "yes": whenever it fits
            the budget; "no": never. The ``.npy`` holds the same perturbations at a quarter of the
            size either way; the manifest's ``outputs`` says why poison.pt was or was not written.
        image_key, label_key: a WebDataset input's image member (default: the first of jpg,
            jpeg, png, webp, ...) and the field of its ``json`` member that holds the label
            (default: the integer in its ``cls`` member); a table's image and label columns
            (default: image/img/..., label/labels/fine_label/...).
        key_file: a keyed method (``cuda``): write its private key (the seed and what it
            draws) to this new file outside ``output_dir``, as JSON, owner-readable only.
            Without it the key is in none of the outputs (the manifest records no seed; the
            work folder's checkpoint holds it while the run lasts, and after it with
            ``keep_checkpoint``) and is lost with the run; an existing file is never replaced.

    A method that is not an L_p perturbation (``cuda``: the output is the filtered image)
    has no eps; the manifest's ``budget`` says what bounds its change and checks it.

    Warns (:class:`UnchangedImagesWarning`) when some output images equal their inputs; the
    manifest's ``unchanged_images`` counts them.
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps <= 255)):
        raise ValueError(f"eps must be in (0, 255] (units of 1/255), got {eps!r}")
    if not (compile in (False, True) or compile in COMPILE_MODES):
        raise ValueError(f"compile must be False, True or one of {COMPILE_MODES}, got {compile!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    check_store(store)
    budget = parse_size(memory_budget) if memory_budget is not None else None
    output_dir = Path(output_dir)
    sinks = sinks_for(output_format)
    check_png_level(png_compression)
    if poison_pt not in POISON_PT_MODES:
        raise ValueError(f"poison_pt must be one of {', '.join(POISON_PT_MODES)}, got {poison_pt!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float)) \
            or not 0 <= checkpoint_every < math.inf:
        raise ValueError(f"checkpoint_every must be a number of seconds >= 0, got {checkpoint_every!r}")
    src = find_source(source, image_key=image_key, label_key=label_key)
    if output_format in ("webdataset", "parquet") and src.name != output_format:
        raise ValueError(f"output_format {output_format!r} writes a {output_format} input's other members or "
                         f"columns back; {'arrays' if src.name == 'arrays' else source} is read as {src.name}: "
                         "use 'png'")
    input_dir = None if src.name == "arrays" else Path(source)
    src.check(input_dir if input_dir is not None else source, order=order, split=split, resize=resize)
    if output_format == "apbench":  # a CIFAR/SVHN training set in its own order, or refused before anything is written
        p = Path(source) if src.name == "distribution" else None
        apbench_key(p and {"format": detect(p), "order": "index", "split": None if p.is_file() else split,
                           "files": [str(p)]})
    if resize is not None:
        _check_resize_for(method, resize)
    cls = METHODS[method]
    dev = resolve_device(device)  # every run's check, before torchrun's group is joined
    if env_world_size() > 1 and not cls.distributed:
        raise ValueError(f"method {method!r} does not run under torchrun yet ({cls.distributed_why}); "
                         "run it in one process")
    dist, dist_device = from_env(device)
    main = dist is None or dist.main
    if main:
        _check_dirs(input_dir, output_dir, overwrite, resume)
    dev = dist_device or dev
    progress = progress and main
    if progress and dev.type == "cpu" and preset is None and "cpu-small" in cls.presets and not any(
            v is not None for v in (epochs, pgd_steps, arch, batch_size, poison_batch_size)) and not settings:
        paper = cls.config_class()
        sched = ", ".join(f"{k} {getattr(paper, k)}" for k in ("arch", "epochs", "pgd_steps") if hasattr(paper, k))
        note(f"note: {method} runs its paper's schedule ({sched}) on the CPU, a GPU-sized job (hours for a few "
             "hundred images); --preset cpu-small is a CPU-sized schedule that protects measurably in minutes")
    key_file = _check_key_file(key_file, cls, method, output_dir)
    overrides = dict(epochs=epochs, pgd_steps=pgd_steps, arch=arch, loss=loss, batch_size=batch_size,
                     poison_batch_size=poison_batch_size, seed=seed)
    gen, cfg, eps = build_generator(cls, method, eps, overrides, settings, preset=preset, resume=resume, output_dir=output_dir,
                            store=store, delta_dtype=delta_dtype, sparse=sparse, robust=robust,
                                    robust_settings=robust_settings)

    src.check_input(input_dir, order=order, main=main)  # a bad input fails here, before an output is replaced
    work = output_dir / CHECKPOINT_DIR
    ckpt = work / "checkpoint.pt"
    # (errors of creating the folder itself are the CLI's to explain: nothing is written yet)
    with _output_run(output_dir, main, overwrite, resume, ckpt), _readable_write_errors(output_dir, ckpt):
        return _generate(source=source, src=src, sinks=sinks, png_compression=png_compression, poison_pt=poison_pt,
                         checkpoint_every=checkpoint_every, input_dir=input_dir, split=split, main=main, dist=dist,
                         work=work, ckpt=ckpt, resize=resize, skip_bad=skip_bad, workers=workers,
                         progress=progress, order=order, gen=gen, dev=dev, profile=profile,
                         output_dir=output_dir, compile=compile, delta_dtype=delta_dtype, store=store,
                         budget=budget, sync_bn=sync_bn, float64=float64, resume=resume, eps=eps,
                         rounding=rounding, cls=cls, cfg=cfg, method=method, key_file=key_file, sparse=sparse,
                         preset=preset, t_start=t_start, keep_checkpoint=keep_checkpoint)


def _check_key_file(key_file, cls, method: str, output_dir: Path) -> Path | None:
    """A keyed method's key file: a new file outside the output folder, in a folder that exists."""
    if key_file is None:
        return None
    key_file = Path(key_file)
    if not cls.keyed:
        raise ValueError(f"method {method!r} has no private key; key_file applies to keyed methods "
                         f"({sorted(n for n, c in METHODS.items() if c.keyed)})")
    if key_file.exists():
        raise ValueError(f"{key_file} exists; a key file is never replaced (choose a new path)")
    if Path(output_dir).resolve() in key_file.resolve().parents:
        raise ValueError(f"the key file {key_file} must be outside the output folder {output_dir}: the "
                         "output is what gets shared, and --overwrite replaces it")
    if not key_file.parent.is_dir():
        raise ValueError(f"{key_file.parent} is not a folder; cannot write the key file there")
    return key_file


def _generate(*, source, src, sinks, png_compression, poison_pt, checkpoint_every, input_dir, split, main, dist, work, ckpt,
              resize, skip_bad, workers, progress, order,
              gen, dev, profile, output_dir, compile, delta_dtype, store, budget, sync_bn, float64, resume, eps,
              rounding, cls, cfg, method, key_file, sparse, preset, t_start, keep_checkpoint) -> dict:
    """Read the data, run the method, write the outputs and the manifest (``protect`` has checked
    every argument and holds the output folder)."""
    if dist is not None:
        barrier()  # the output folder is ready (replaced, created) before any process writes in it

    t0 = time.perf_counter()
    ingest: dict = {}
    data: ImageSet = src.ingest(source if input_dir is None else input_dir, work, split=split, order=order,
                                resize=resize, skip_bad=skip_bad, workers=workers, progress=progress, stats=ingest,
                                main=main, barrier=barrier if dist is not None else None)
    t_read = time.perf_counter() - t0
    if main:  # what this run will write, recorded before it writes any of it (--overwrite removes only that)
        planned = [*planned_files(sinks, output_dir, data, eps, cls.classwise, method), "manifest.json",
                   *(["profile_trace.json"] if profile else [])]
        write_json_atomic(work / OUTPUTS_FILE, {"files": planned})

    runner = Runner(gen, data.images, data.labels, len(data.classes), dev, checkpoint_path=ckpt, progress=progress,
                    profile=profile, trace_path=output_dir / "profile_trace.json" if profile else None,
                    compile=compile, delta_dtype=delta_dtype, store=store, memory_budget=budget, work_dir=work,
                    images_file=data.file, dist=dist, sync_bn=sync_bn, float64=float64,
                    notify=note if progress else None, checkpoint_every=checkpoint_every)
    result = runner.run(resume=resume)

    t0 = time.perf_counter()
    if not main:  # rank 0 writes; the others send their rows as it reads them
        for a in range(0, len(data), output_step(data.images.shape[1:])):
            result.read(a, min(len(data), a + output_step(data.images.shape[1:])))
        barrier()
        return _broadcast(None)
    out = write_outputs(output_dir, data, result, eps, rounding, 0 if cls.keyed else cfg.seed,
                        gen.store.all().cpu() if cls.classwise else None, budget, progress, sinks=sinks,
                        png_level=png_compression, workers=workers or default_workers(), method=method,
                        poison_pt=poison_pt)
    if left_out := describe_left_out(data.ignored, data.skipped):
        warnings.warn(left_out, LeftOutWarning, stacklevel=2)
    if out["unchanged"]:
        warnings.warn(_unchanged_message(out["unchanged"], len(data), out["mean_abs_255"], method, cfg, rounding),
                      UnchangedImagesWarning, stacklevel=2)
    t_write = time.perf_counter() - t0
    timings = {"read images": t_read, **result.timings, "writing": t_write}
    if cls.keyed and key_file is not None:
        _write_key(key_file, gen.key())
    manifest = _manifest(method=method, cls=cls, cfg=cfg, gen=gen, eps=eps, compile=compile, sparse=sparse,
                         delta_dtype=delta_dtype, preset=preset, key_file=key_file, dev=dev, input_dir=input_dir,
                         output_dir=output_dir, data=data, out=out, left_out=left_out, rounding=rounding,
                         store=store, budget=budget, ingest=ingest, dist=dist, sync_bn=sync_bn, float64=float64,
                         profile=profile, result=result, timings=timings, t_start=t_start)
    write_json_atomic(output_dir / "manifest.json", manifest)
    if dist is not None:
        barrier()  # every process is done with the work folder
    if not keep_checkpoint:
        shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)
    return _broadcast(manifest) if dist is not None else manifest


def _write_key(path: Path, key: dict) -> None:
    """The key as JSON in a new file (exclusive creation: an existing key is never replaced), owner-only."""
    import json

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def barrier() -> None:
    import torch.distributed

    torch.distributed.barrier()


def _broadcast(obj):
    """Rank 0's ``obj`` on every process."""
    import torch.distributed

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
