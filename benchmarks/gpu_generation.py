"""MI-UE generation time: ue_fast against the plain implementation on the same CIFAR-10 images.

The generation step of gpu_check.sh; standalone:

    python benchmarks/gpu_generation.py --out gen.json --tarball cifar10-jpeg.tar.gz

``--phase main`` (default):

1. data: ``--per-class`` images of each class of the tarball's training split (without
   ``--tarball``: of the demo subset shipped in the package);
2. ue_fast: ``ue_fast.protect(method="miue")`` for ``--epochs`` outer epochs on its default
   path (on CUDA: bf16 autocast, channels-last, images and perturbations on the GPU);
3. plain: benchmarks/plain_miue.py for ``--plain-epochs`` outer epochs on the same images;
4. profile: ``protect(profile=True)`` for 2 outer epochs on the first ``--profile-images``
   images: time per stage (synchronised at every stage, so slower than step 2) and the
   kernels that take the time in the torch.profiler trace of its first epoch.

``--phase compiled``: ``--compile-images`` images, 2 outer epochs eager and 2 with
``compile=--compile`` (CUDA graphs with "reduce-overhead"); the first compiled epoch
pays the compilation.

Every phase adds its part to the ``--out`` JSON as soon as it is done, so a run cut
off by a timeout still reports what it measured. Per outer epoch the time is
``train_s + poison_s`` of the manifest's history (data on the device, writing the
outputs excluded); ms per image divides it by the number of images.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from _common import sync

FULL_SCHEDULE = 100 * 50_000  # image-epochs of the authors' CIFAR-10 schedule
STAGE_KEYS = ("data", "surrogate training", "forward", "loss", "backward", "step")


def load_images(tarball: str | None, per_class: int):
    """A class-balanced subset: images [N, 3, H, W] uint8, labels [N], class names, description."""
    from ue_fast.data import demo_dir, read_image_folder

    if tarball:
        from ue_fast.data.cifar import load_cifar_subset

        data = load_cifar_subset(tarball, "train", per_class, seed=0)
        return data.images, data.labels, data.classes, f"{Path(tarball).name} (train, {per_class} per class)"
    data = read_image_folder(demo_dir() / "train", progress=False)
    idx = torch.cat([torch.nonzero(data.labels == c)[:per_class, 0] for c in range(len(data.classes))])
    if len(idx) != per_class * len(data.classes):
        raise ValueError(f"the demo subset has fewer than {per_class} images in some class")
    return data.images[idx], data.labels[idx], data.classes, f"demo subset (train, {per_class} per class)"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _epochs(history: list[dict], n: int) -> list[dict]:
    out = []
    for h in history:
        if "epoch" not in h:
            continue
        s = h["train_s"] + h["poison_s"]
        out.append(dict(epoch=h["epoch"], train_s=h["train_s"], poison_s=h["poison_s"], s=s,
                        ms_per_image=1e3 * s / n, images_per_s=n / s))
    return out


def run_ue_fast(images, labels, classes, work: Path, device: torch.device, **settings) -> dict:
    """``ue_fast.protect`` on arrays into ``work`` (removed afterwards); per-epoch times and checks."""
    import ue_fast

    _reset_peak(device)
    m = ue_fast.protect((images, labels, classes), work, method="miue", device=str(device), progress=False,
                        overwrite=True, **settings)
    eps_255 = m["settings"]["eps_255"]
    changed = sum(1 for f in m["files"] if f["linf_255"] > 0)
    out = dict(settings=m["settings"], device=m["device"], epochs=_epochs(m["history"], len(images)),
               generation_s=m["generation_s"], total_s=m["total_s"], timings_s=m["timings_s"],
               linf_max_255=m["linf_max_255"], eps_255=eps_255, images_changed=changed,
               peak_gpu_bytes=_peak(device))
    if not 0 < m["linf_max_255"] <= eps_255:
        raise AssertionError(f"ue_fast: L-inf of the output {m['linf_max_255']}/255 not in (0, {eps_255}]")
    trace = work / "profile_trace.json"
    if trace.exists():
        out["trace"] = top_of_trace(trace)
    shutil.rmtree(work, ignore_errors=True)
    return out


def run_plain(images, labels, num_classes: int, arch: str, epochs: int, schedule_epochs: int,
              device: torch.device) -> dict:
    """benchmarks/plain_miue.py's outer epoch, timed per epoch (synchronised)."""
    from plain_miue import outer_epoch
    from ue_fast.methods import MIUEConfig
    from ue_fast.models import build_model

    cfg = MIUEConfig(arch=arch, epochs=schedule_epochs)
    torch.manual_seed(cfg.seed)
    model = build_model(arch, num_classes, image_size=max(images.shape[2:])).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x = images.float() / 255
    poison = torch.zeros(x.shape)
    gen = torch.Generator().manual_seed(cfg.seed)
    _reset_peak(device)
    rows = []
    for e in range(1, epochs + 1):
        for group in opt.param_groups:
            group["lr"] = cfg.learning_rate(e)
        t0 = time.perf_counter()
        poison = outer_epoch(model, opt, x, labels, poison, device=device, eps=cfg.eps, alpha=cfg.step_size(e),
                             steps=cfg.pgd_steps, batch_size=cfg.batch_size,
                             poison_batch_size=cfg.poison_batch_size, gen=gen)
        sync(device)
        s = time.perf_counter() - t0
        rows.append(dict(epoch=e, s=s, ms_per_image=1e3 * s / len(x), images_per_s=len(x) / s))
    linf = float((poison * 255).abs().max())
    if not 0 < linf <= cfg.eps * 255 + 1e-3:
        raise AssertionError(f"plain: L-inf of the perturbation {linf:.3f}/255 not in (0, {cfg.eps * 255:g}]")
    return dict(epochs=rows, linf_max_255=linf, peak_gpu_bytes=_peak(device))


def top_of_trace(path: Path, k: int = 12, max_bytes: int = 400 * 2**20) -> dict:
    """The ``k`` GPU kernels (CPU: operators, inclusive time) taking the most time in a Chrome trace."""
    if path.stat().st_size > max_bytes:
        return dict(note=f"trace of {path.stat().st_size / 2**20:.0f} MiB not read")
    with open(path) as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    kind = "GPU kernels" if kernels else "CPU operators (inclusive time: nested operators count twice)"
    chosen = kernels or [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    total = defaultdict(float)
    count = defaultdict(int)
    for e in chosen:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    all_us = sum(total.values())
    top = sorted(total.items(), key=lambda kv: -kv[1])[:k]
    out = dict(kind=kind, total_ms=all_us / 1e3,
               top=[dict(name=n[:120], ms=us / 1e3, share=us / all_us if all_us else 0.0, calls=count[n])
                    for n, us in top])
    if kernels:  # busy fraction: kernel time over the traced span (overlapping streams would count twice)
        ts = [e["ts"] for e in kernels] + [e["ts"] + e["dur"] for e in kernels]
        out["gpu_busy_fraction"] = all_us / max(max(ts) - min(ts), 1e-9)
    return out


def phase_main(args, device, result: dict, save) -> None:
    t0 = time.perf_counter()
    images, labels, classes, source = load_images(args.tarball, args.per_class)
    n = len(images)
    result["data"] = dict(source=source, images=n, image_size=list(images.shape[2:]),
                          read_s=time.perf_counter() - t0)
    save()
    common = dict(arch=args.arch)
    result["ue_fast"] = run_ue_fast(images, labels, classes, args.work / "ue_fast", device,
                                    epochs=args.epochs, **common)
    save()
    result["plain"] = run_plain(images, labels, len(classes), args.arch, args.plain_epochs, args.epochs, device)
    result["comparison"] = compare(result["ue_fast"]["epochs"], result["plain"]["epochs"])
    save()
    m = min(args.profile_images, n)
    sub = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:m].sort().values  # classes stay mixed
    prof = run_ue_fast(images[sub], labels[sub], classes, args.work / "profile", device, epochs=2, profile=True,
                       **common)
    timed = {k: v for k, v in prof["timings_s"].items() if k in STAGE_KEYS}
    total = sum(timed.values())
    prof["stage_shares"] = {k: v / total for k, v in sorted(timed.items(), key=lambda kv: -kv[1])} if total else {}
    prof["images"] = m
    result["profile"] = prof
    save()


def phase_compiled(args, device, result: dict, save) -> None:
    images, labels, classes, source = load_images(args.tarball, args.per_class)
    m = min(args.compile_images, len(images))
    sub = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:m].sort().values
    images, labels = images[sub], labels[sub]
    result["data"] = dict(source=source, images=m, image_size=list(images.shape[2:]))
    result["eager"] = run_ue_fast(images, labels, classes, args.work / "eager", device, epochs=2, arch=args.arch)
    save()
    result["compiled"] = run_ue_fast(images, labels, classes, args.work / "compiled", device, epochs=2,
                                     arch=args.arch, compile=args.compile)
    eager, comp = result["eager"]["epochs"][-1], result["compiled"]["epochs"][-1]
    result["compile_mode"] = args.compile
    result["speedup_last_epoch"] = eager["s"] / comp["s"]
    save()


def compare(ours: list[dict], plain: list[dict]) -> dict:
    """ms per image per outer epoch, ratios (plain / ue_fast: > 1 means ue_fast is faster) and
    the projected time of the full schedule (100 outer epochs x 50,000 images)."""
    steady = ours[-1]["ms_per_image"]  # the last epoch: warm-up (kernel compilation, autotuning) is in the first
    p = plain[-1]["ms_per_image"]
    return dict(ue_fast_ms_per_image_first=ours[0]["ms_per_image"], ue_fast_ms_per_image_last=steady,
                plain_ms_per_image=p, plain_over_ue_fast_last=p / steady,
                plain_over_ue_fast_first=p / ours[0]["ms_per_image"],
                full_schedule_hours=dict(ue_fast=steady * FULL_SCHEDULE / 3.6e6, plain=p * FULL_SCHEDULE / 3.6e6))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the protect outputs")
    ap.add_argument("--phase", choices=("main", "compiled"), default="main")
    ap.add_argument("--tarball", default=None, help="CIFAR-10 image-folder tarball (default: the demo subset)")
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--plain-epochs", type=int, default=1)
    ap.add_argument("--profile-images", type=int, default=2048)
    ap.add_argument("--compile", default="reduce-overhead")
    ap.add_argument("--compile-images", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for name in ("per_class", "epochs", "plain_epochs", "profile_images", "compile_images"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tarball and not Path(args.tarball).is_file():
        ap.error(f"--tarball {args.tarball}: no such file")
    args.work = args.work or args.out.parent / f"{args.out.stem}-work"
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # plain_miue, plain_methods
    device = torch.device(args.device)
    result = dict(phase=args.phase, device=str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                                          if device.type == "cuda" else ""),
                  arch=args.arch, torch=torch.__version__)

    def save():
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)

    save()
    (phase_main if args.phase == "main" else phase_compiled)(args, device, result, save)
    shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("comparison", "speedup_last_epoch") if k in result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
