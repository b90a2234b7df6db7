"""Reproduce the MI-UE CIFAR-10 results: clean vs every generator, victims under each defence, MI gap.

    python benchmarks/reproduce.py --scale small            # this CPU, well under an hour
    python benchmarks/reproduce.py --scale full --device cuda   # the paper's setting, on a GPU

small: a class-balanced subset of CIFAR-10 (100 training and 100 test images per
class), cnn-small surrogates and victims (15 epochs), each method's ``cpu-small``
preset (``ue_fast.methods``; MI-UE: the demo's 20 outer epochs x 5 PGD steps of
1/255). Clean vs MI-UE under all eight defences took 19 minutes on a (busy)
2-core CPU, the most of it in adversarial training (11 forward-backward passes
per batch); each further method adds about as much as MI-UE: pick --methods /
--defenses to fit the time you have. full: all
50,000 training and 10,000 test images, each method's ``paper`` preset (its authors'
settings; MI-UE: ResNet-18, 100 outer epochs x 10 PGD steps), victims trained 40 epochs.

Reads ../shared/data/cifar10-jpeg.tar.gz (or --tarball). Writes
benchmarks/results/reproduce-<scale>-<device>-<date>.json and .md: test accuracy
(last and best epoch) of a victim trained on each set under each defence, the
accuracy gap (clean minus protected, same defence), and the MI gap. Our CIFAR-10
copy is a JPEG re-encoding: compare gaps with the paper, not absolute accuracies.
Paper (ResNet-18, standard training): accuracy gap MI-UE 84.50%, EM 70.28%,
AP 83.24%, REM 71.51%; MI gap MI-UE 0.2153, EM 0.0722, AP 0.1251, REM 0.0832.

--mixed F: partial protection, the Bayes-error UEs paper's test. A fixed, class-balanced
fraction F of the training images is protected and the rest stays clean; victims
train on the clean rest alone ("clean part") and on the clean rest plus the
protected images ("<method> mixed"), under the same defences. A protection with the
paper's property leaves the mixed victim worse than the clean part alone (Bayes UEs,
CIFAR-10, F = 0.5: 69.68% vs 91.16%).

--set METHOD.KEY=VALUE (repeatable) overrides one generation setting of the scale,
e.g. the Bayes-error authors' schedule (a surrogate retrained from scratch for 30
epochs before every ascent step on the whole set's estimate):
    --set bayes.retrain_epochs=30 --set bayes.whole_set=True --set bayes.pgd_steps=1
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ue_fast
from ue_fast.data import ImageSet, load_cifar_subset, read_image_folder, write_json_atomic
from ue_fast.evaluate import DEFENSES
from ue_fast.evaluate.run import protected_mask
from ue_fast.methods import METHODS
from ue_fast.methods.settings import parse_value

HERE = Path(__file__).resolve().parent
TARBALL = HERE.parents[1] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PAPER_GAP = {"miue": 84.50, "em": 70.28, "ap": 83.24, "rem": 71.51}
PAPER_MI_GAP = {"miue": 0.2153, "em": 0.0722, "ap": 0.1251, "rem": 0.0832}

SCALES = {
    "small": dict(train_per_class=100, test_per_class=100, victim="cnn-small", victim_epochs=15),
    "full": dict(train_per_class=None, test_per_class=None, victim="resnet18", victim_epochs=40),
}
# The methods' presets per scale: small runs each method's "cpu-small" preset (cnn-small
# surrogates on schedules that fit a CPU), full its "paper" preset (its defaults).
PRESET = {"small": "cpu-small", "full": "paper"}


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _table(rows: list[dict], defenses: list[str], sets: list[str]) -> str:
    acc = {(r["set"], r["defense"]): r for r in rows}
    head = "| defence | " + " | ".join(f"{s} (last / best)" for s in sets) + " | " + \
        " | ".join(f"gap {s}" for s in sets if s != "clean") + " |"
    lines = [head, "|" + "---|" * (1 + len(sets) + len(sets) - 1)]
    for d in defenses:
        cells = []
        for s in sets:
            r = acc.get((s, d))
            cells.append(f"{100 * r['last']:.2f} / {100 * r['best']:.2f}" if r else "-")
        gaps = []
        for s in sets:
            if s == "clean":
                continue
            r, c = acc.get((s, d)), acc.get(("clean", d))
            gaps.append(f"{100 * (c['last'] - r['last']):.2f}" if r and c else "-")
        lines.append(f"| {d} | " + " | ".join(cells) + " | " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def _mixed_sets(train: ImageSet, protected: dict[str, ImageSet], fraction: float) -> dict[str, ImageSet]:
    """The clean part alone, and per method the clean part plus the protected rest.

    Per class a fixed random ``fraction`` of the images (seed 0) is protected; the
    same images for every method.
    """
    clean = ~protected_mask(train.labels, len(train.classes), fraction, seed=0)
    keep = torch.nonzero(clean)[:, 0].tolist()
    out = {"clean part": ImageSet(train.images[clean], train.labels[clean], train.classes,
                                  [train.paths[i] for i in keep])}
    for m, prot in protected.items():
        images = torch.where(clean[:, None, None, None], train.images, prot.images)
        out[f"{m} mixed"] = ImageSet(images, train.labels, train.classes, list(train.paths))
    print(f"== mixed: {int(clean.sum())} clean images kept, {len(train) - int(clean.sum())} protected", flush=True)
    return out


def _protect_kwargs(methods: list[str], scale: str, overrides: dict[str, dict]) -> dict[str, dict]:
    """Per method, the keywords of ``ue_fast.protect``: the scale's preset by name and the
    ``--set`` overrides. protect's own ``eps`` is in units of 1/255, a config's (a preset's, an
    override's) in [0, 1]: converted. A keyed method (cuda) draws a fresh key per run unless
    given one: seed 7, so a rerun gives the same sets."""
    out = {}
    for m in methods:
        kw = dict(preset=PRESET[scale], **overrides.get(m, {}))
        if "eps" in kw:
            kw["eps"] = kw["eps"] * 255
        if METHODS[m].keyed:
            kw.setdefault("seed", 7)
        out[m] = kw
    return out


def _overrides(items: list[str], methods: list[str]) -> dict[str, dict]:
    """``["bayes.whole_set=True", ...]`` -> ``{"bayes": {"whole_set": True}}``; values as
    ``ue-fast protect --set`` reads them (Python literals, N/D fractions, else strings).
    ValueError names a malformed item or an unselected method."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and name):
            raise ValueError(f"--set takes METHOD.KEY=VALUE, got {item!r}")
        if method not in methods:
            raise ValueError(f"--set {item!r}: method {method!r} is not among --methods {methods}")
        out.setdefault(method, {})[name] = parse_value(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=["miue"], choices=sorted(METHODS),
                   help="generators to compare with clean data (default miue)")
    p.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=list(DEFENSES))
    p.add_argument("--victim-epochs", type=int, default=None, help="override the scale's victim epochs")
    p.add_argument("--train-per-class", type=int, default=None, metavar="K",
                   help="override the scale's training images per class (small: 100, full: all)")
    p.add_argument("--no-mi", action="store_true", help="skip the MI gap")
    p.add_argument("--mixed", type=float, default=None, metavar="F",
                   help="also train on a clean part alone and with a protected fraction F of the set, in (0, 1)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE", dest="overrides",
                   help="override a generation setting, e.g. bayes.whole_set=True (repeatable)")
    p.add_argument("--tarball", type=Path, default=TARBALL)
    p.add_argument("--workdir", type=Path, default=None, help="keep the protected folders here")
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/...)")
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    if not args.tarball.is_file():
        p.error(f"CIFAR-10 tarball not found: {args.tarball} (pass --tarball)")
    if args.mixed is not None and not 0 < args.mixed < 1:
        p.error(f"--mixed must be a fraction in (0, 1), got {args.mixed}")
    try:
        overrides = _overrides(args.overrides, args.methods)
    except ValueError as e:
        p.error(str(e))
    protect = _protect_kwargs(args.methods, args.scale, overrides)

    scale = dict(SCALES[args.scale])
    if args.train_per_class is not None:
        if args.train_per_class < 1:
            p.error(f"--train-per-class must be >= 1, got {args.train_per_class}")
        scale["train_per_class"] = args.train_per_class
    epochs = args.victim_epochs or scale["victim_epochs"]
    dev = torch.device(args.device)
    day = datetime.date.today().isoformat()
    tag = "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev).replace(" ", "-")
    stem = args.out or HERE / "results" / f"reproduce-{args.scale}-{tag}-{day}"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ue_fast_reproduce_"))
    t_start = time.perf_counter()

    print(f"reading CIFAR-10 from {args.tarball} ...", flush=True)
    train = load_cifar_subset(args.tarball, "train", scale["train_per_class"], seed=0)
    test = load_cifar_subset(args.tarball, "test", scale["test_per_class"], seed=0)
    clean_dir = work / "clean"
    if not clean_dir.exists():
        ue_fast.data.write_image_folder(clean_dir, train.images, train.paths)
    sets = {"clean": train}
    generation = {}
    for m in args.methods:
        out = work / m
        print(f"== protect: {m} ({len(train)} images)", flush=True)
        man = ue_fast.protect(clean_dir, out, method=m, device=str(dev), overwrite=True, **protect[m])
        generation[m] = {k: man[k] for k in ("generation_s", "images_per_s", "linf_max_255", "settings")}
        sets[m] = read_image_folder(out, progress=False)
    if args.mixed is not None:
        sets.update(_mixed_sets(train, {m: sets[m] for m in args.methods}, args.mixed))

    rows = []
    for d in args.defenses:
        for name, data in sets.items():
            print(f"== victim {scale['victim']} x{epochs}: {name}, defence {d}", flush=True)
            r = ue_fast.evaluate(data, test, arch=scale["victim"], epochs=epochs, defense=d, device=str(dev),
                                 label=f"{name} ({d})", progress=False)
            rows.append(dict(set=name, defense=d, last=r["last"], best=r["best"], test_acc=r["test_acc"],
                             seconds=r["timings_s"]["total"]))
            print(f"   last {100 * r['last']:.2f}%  best {100 * r['best']:.2f}%", flush=True)

    mi = {}
    if not args.no_mi:
        from ue_fast.evaluate.victim import train_victim
        from ue_fast.metrics import mi_report

        print("== MI gap: reference victim trained on the clean set", flush=True)
        ref = train_victim(train.images, train.labels, test.images, test.labels, len(train.classes),
                           arch=scale["victim"], epochs=epochs, device=dev, return_model=True)
        for m in args.methods:
            mi[m] = mi_report(ref.model, train.images, sets[m].images, train.labels, len(train.classes), device=dev)
            print(f"   {m}: " + ", ".join(f"{k} {v:.4f}" for k, v in mi[m].items() if isinstance(v, float)))

    doc = dict(scale=args.scale, settings=dict(scale, protect=protect),
               victim_epochs=epochs, device=str(dev) + (
        f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f" ({os.cpu_count()} cores)"),
        versions=dict(ue_fast=ue_fast.__version__, torch=torch.__version__, python=platform.python_version()),
        commit=_commit(), date=day, num_train=len(train), num_test=len(test), generation=generation,
        mixed_fraction=args.mixed,
        results=rows, mi=mi, paper=dict(accuracy_gap=PAPER_GAP, mi_gap=PAPER_MI_GAP),
        total_s=time.perf_counter() - t_start)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), doc)

    names = list(sets)
    md = [f"# MI-UE reproduction, scale {args.scale}", "",
          f"{len(train)} CIFAR-10 training images (JPEG copy), {len(test)} clean test images; "
          f"victim {scale['victim']} trained {epochs} epochs; device {doc['device']}; commit {doc['commit']}; "
          f"{doc['total_s'] / 60:.1f} min in all. Command: `{command}`.",
          "", "Clean test accuracy (%) of the victim, last and best epoch; gap = clean minus protected (last):", "",
          *([f"With --mixed {args.mixed}: 'clean part' is the {1 - args.mixed:.0%} of the images left clean, "
             f"'<method> mixed' those plus the other {args.mixed:.0%} protected.", ""] if args.mixed else []),
          _table(rows, args.defenses, names), ""]
    if mi:
        keys = [k for k, v in next(iter(mi.values())).items() if isinstance(v, float)]
        md += ["Feature statistics (features of a victim trained on the clean set):", "",
               "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        md += [f"| {m} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for m, r in mi.items()]
        md.append("")
    md += ["Paper (CIFAR-10, ResNet-18, standard training): accuracy gap "
           + ", ".join(f"{k} {v}%" for k, v in PAPER_GAP.items()) + "; MI gap "
           + ", ".join(f"{k} {v}" for k, v in PAPER_MI_GAP.items()) + ".", ""]
    for m, g in generation.items():
        md.append(f"Generation ({m}): {g['generation_s']:.0f} s, {g['images_per_s']:.0f} images/s per outer epoch, "
                  f"max |delta| {g['linf_max_255']}/255.")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
