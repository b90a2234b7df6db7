"""``evaluate``: how well does a (protected) training folder resist training?

Trains a victim on the training images with the standard recipe (``train_victim``),
optionally under a defence, and reports the clean test accuracy after every
epoch; with ``mi=True`` also the feature statistics of ``ue_fast.metrics`` (MI
gap, intra-class cosine, covariance trace) from a model trained on the clean
counterparts of the protected images. Results are a JSON document (``FORMAT``)
and a PNG plot of the accuracy curves (``ue_fast.evaluate.plot``).
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from .. import __version__
from ..data import ImageSet, read_json, write_json_atomic
from ..data.canonical import detect, read_dataset
from ..data.poisons import kind_of, load_poisoned
from ..models import ARCHS, recipe
from .defenses import DEFENSES, get_defense
from .victim import VictimResult, train_victim

FORMAT = "ue_fast.evaluate/1"  # the results document's format; plots refuse others


def _load(source, what: str, resize, split: str = "train", order=None) -> ImageSet:
    if isinstance(source, ImageSet):
        return source
    path = Path(source)
    if not path.is_dir() and detect(path) is None:
        raise ValueError(f"{what} folder {path} does not exist or is not a folder (or a data set: "
                         "cifar-10-batches-py/, cifar-100-python/, an SVHN .mat, a .npz)")
    return read_dataset(path, split, order=order, resize=resize)


def _clean_counterpart(train_dir: Path | None, protected: ImageSet, clean, resize) -> ImageSet:
    """The clean images of a protected set, in the protected set's order.

    ``clean``: a folder (or ImageSet) with the same relative paths up to the file
    extension (protect() writes ``cat/0001.jpg`` as ``cat/0001.png``); None reads the
    input folder recorded in ``train_dir/manifest.json``.
    """
    if clean is None:
        manifest = train_dir / "manifest.json" if train_dir is not None else None
        if manifest is None or not manifest.is_file():
            raise ValueError("mi, ud and poison_ratio need the clean images: pass clean=DIR (--clean DIR); "
                             "the training folder has no manifest.json from `ue-fast protect` naming its input")
        doc = read_json(manifest)
        # "input" is the path as typed (maybe relative to where protect ran); "input_abs" is resolved.
        src = doc.get("input_abs") or doc.get("input")
        if not src or src == "arrays" or not (Path(src).is_dir() or detect(src) is not None):
            raise ValueError(f"the manifest of {train_dir} names input {src!r}, which is not a folder here: "
                             "pass clean=DIR (--clean DIR)")
        clean = src
        split = (doc.get("dataset") or {}).get("split") or "train"
    else:
        split = "train"
    data = _load(clean, "clean", resize, split)
    if data.classes != protected.classes:
        raise ValueError(f"clean and protected folders have different classes: {data.classes} vs {protected.classes}")
    by_stem = {str(Path(p).with_suffix("")): i for i, p in enumerate(data.paths)}
    missing = [p for p in protected.paths if str(Path(p).with_suffix("")) not in by_stem]
    if missing:
        raise ValueError(f"{len(missing)} protected images have no clean counterpart (e.g. {missing[0]!r})")
    idx = torch.tensor([by_stem[str(Path(p).with_suffix(""))] for p in protected.paths])
    if data.image_size != protected.image_size:
        raise ValueError(f"clean images are {data.image_size}, protected {protected.image_size}: pass resize")
    return ImageSet(images=data.images[idx], labels=data.labels[idx], classes=data.classes,
                    paths=[data.paths[i] for i in idx.tolist()])


def protected_mask(labels: torch.Tensor, num_classes: int, ratio: float, seed: int = 0) -> torch.Tensor:
    """bool [N]: which images a partial protection of ``ratio`` protects. Per class, in label
    order, a permutation of its images drawn from one generator seeded with ``seed``; the last
    ``round(ratio * n_c)`` of it are protected, the rest stay clean. Seeded and class-balanced:
    the same images whatever the method."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(num_classes):
        idx = torch.nonzero(labels == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        mask[idx[len(idx) - round(ratio * len(idx)):]] = True
    return mask


def evaluate(train, test, *, arch: str = "resnet18", epochs: int = 40, defense: str = "none",
             adv_eps: float = 8, adv_norm: str = "linf", jpeg_quality: int = 10, batch_size: int = 128,
             lr: float | None = None, weight_decay: float | None = None,
             device: str | None = None, seed: int = 0, resize=None, mi: bool = False, clean=None,
             order=None, poison_ratio: float | None = None, ud: bool = False, ud_samples: int | None = 2048,
             ud_iters: int = 10, ud_rho: float = 0.05, ud_reference=None, out=None, plot: bool = True,
             progress: bool = True,
             label: str | None = None) -> dict:
    """Train a victim on ``train``, test it on clean ``test`` after every epoch; return the results.

    Args:
        train: the (protected) training set: a folder of class sub-folders (e.g. a ``protect``
            output), a data set (``cifar-10-batches-py/``, ...: its train split), an ``ImageSet``,
            or another tool's poisons against the clean base set ``clean``: an APBench poison
            folder (``<type>_poisons/<dataset>/data/<index>.png``) or a ``poison.pt`` / ``.npy``
            perturbation tensor, sample-wise or class-wise (see ``ue_fast.data.poisons``).
        test: the clean test set (a folder, a data set's test split, or an ``ImageSet``), with the
            same classes.
        clean: the clean base set of another tool's poisons (required for them), in its own order:
            a data set (``cifar-10-batches-py/``, an SVHN ``.mat``, ...) or a folder with ``order``;
            for ``mi``, the clean counterparts of a protected folder.
        order: an order file for a ``clean`` image folder (one relative path per line).
        poison_ratio: partial protection: only a fraction in (0, 1] of the training set, the same
            share of every class drawn with ``seed`` (:func:`protected_mask`), is the protected
            images; the rest are their clean counterparts (``clean``, the base set of another
            tool's poisons, or the input a ``protect`` manifest names). A second victim trains on
            the clean part alone, the reference the partial protection must be compared to: the
            results' ``poison_ratio`` holds its curve.
        arch: victim network, one of ``ue_fast.models.ARCHS``.
        epochs: training epochs (cosine schedule over them).
        lr, weight_decay: default the victim's recipe (``ue_fast.models.RECIPES``): SGD at 0.1
            with 5e-4 for the CNNs, AdamW at 1e-3 with 0.05 for ``vit-small`` and ``cait-small``.
        defense: one of ``DEFENSES``; ``adv_eps`` (units of 1/255) is the radius of
            ``adv-train`` in the norm ``adv_norm`` ("linf" or "l2": an L2 radius of 0.5 is
            127.5); ``jpeg_quality`` (1-100) the quality of ``jpeg``.
        mi: also compute the feature statistics of ``ue_fast.metrics`` from a victim
            of the same recipe trained on the clean counterparts (``clean``: a folder
            or ImageSet; None reads the input named in ``train``'s manifest.json).
        ud: also the unlearnable distance (``ue_fast.evaluate.ud``): the per-layer sharpness-aware
            learnability of the victim after every epoch, on ``ud_samples`` training images (a
            class-balanced, seeded subset; None for all), against the same measure on a victim of the
            same recipe and defence trained on the clean counterparts (``clean``, or the input named
            in ``train``'s manifest); ``ud_iters`` rounds of descent and ascent within the relative
            ball ``ud_rho``. Results in ``ud``: the figure (1 for clean data, lower is less
            learnable), the threshold, and every epoch's per-layer values. ``ud_reference``: None
            (train the clean victim), ``"self"`` (``train`` is clean data: its own values are the
            reference, UD 1), or the ``ud`` document of an earlier run with the same settings,
            whose clean run is reused (``ue-fast report`` trains each clean victim once).
        out: write the results JSON there (and, with ``plot``, the curves beside it as .png).
        label: the run's name in plots (default: the training folder's name and the defence).

    Returns the results document: per-epoch ``test_acc`` / ``train_acc``, ``best``,
    ``last`` (fractions), settings, versions, timings and ``mi`` when asked for.
    """
    t0 = time.perf_counter()
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if defense not in DEFENSES:
        raise ValueError(f"unknown defense {defense!r}; choose one of {', '.join(DEFENSES)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    for name, v in (("lr", lr), ("weight_decay", weight_decay)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")
                              or (name == "lr" and v == 0)):
            raise ValueError(f"{name} must be a {'positive' if name == 'lr' else 'non-negative'} number, got {v!r}")
    if not (0 < adv_eps <= 255):
        raise ValueError(f"adv_eps must be in (0, 255] (units of 1/255), got {adv_eps!r}")
    if adv_norm not in ("linf", "l2"):
        raise ValueError(f"adv_norm must be 'linf' or 'l2', got {adv_norm!r}")
    if adv_norm != "linf" and defense != "adv-train":
        raise ValueError(f"adv_norm applies to defense 'adv-train', not {defense!r}")
    if jpeg_quality != 10 and defense != "jpeg":
        raise ValueError(f"jpeg_quality applies to defense 'jpeg', not {defense!r}")
    if ud:
        from .ud import check_settings

        check_settings(ud_rho, ud_iters, ud_samples, 0.1)
    if poison_ratio is not None:
        if isinstance(poison_ratio, bool) or not isinstance(poison_ratio, (int, float)) or not 0 < poison_ratio <= 1:
            raise ValueError(f"poison_ratio must be a fraction in (0, 1] (0.2 for 20%), got {poison_ratio!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    train_dir = None if isinstance(train, ImageSet) else Path(train)
    base = None
    if train_dir is not None and kind_of(train_dir) in ("apbench", "tensor"):
        if clean is None:
            raise ValueError(f"{train_dir} holds another tool's poisons ({kind_of(train_dir)}): pass the clean base set "
                             "they were made from, in its own order (clean=..., --clean CIFAR_DIR or --clean FOLDER "
                             "--order FILE)")
        base = _load(clean, "clean base", resize, "train", order)
        tr = load_poisoned(train_dir, base)
    else:
        if train_dir is not None and not train_dir.exists():
            raise ValueError(f"training folder {train_dir} does not exist")
        tr = _load(train, "training", resize)
    te = _load(test, "test", resize, "test")
    if tr.classes != te.classes:
        raise ValueError(f"training and test folders have different classes: {tr.classes} vs {te.classes}")
    if tr.image_size != te.image_size:
        raise ValueError(f"training images are {tr.image_size}, test images {te.image_size}: pass resize")
    rec = recipe(arch)
    lr = rec["lr"] if lr is None else lr
    weight_decay = rec["weight_decay"] if weight_decay is None else weight_decay
    options = {"adv-train": {"eps": adv_eps / 255, "norm": adv_norm}, "jpeg": {"quality": jpeg_quality}}.get(defense, {})
    common = dict(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                  device=dev, progress=progress)
    partial, train_set = None, tr
    if poison_ratio is not None and poison_ratio < 1:
        cl = base if base is not None else _clean_counterpart(train_dir, tr, clean, resize)
        mask = protected_mask(tr.labels, len(tr.classes), poison_ratio, seed)
        train_set = ImageSet(torch.where(mask[:, None, None, None], tr.images, cl.images), tr.labels, tr.classes,
                             tr.paths, origin=tr.origin)
        keep = (~mask).nonzero()[:, 0]
        ref = train_victim(cl.images[keep], cl.labels[keep], te.images, te.labels, len(tr.classes),
                           defense=get_defense(defense, **options), **common)
        partial = {"ratio": poison_ratio, "protected": int(mask.sum()), "clean": len(keep), "seed": seed,
                   "clean_part": {"test_acc": ref.test_acc, "train_acc": ref.train_acc, "best": ref.best,
                                  "last": ref.last}}
    sal = {"protected": [], "clean": []}
    ud_opts = dict(rho=ud_rho, iters=ud_iters)

    def measure(which: str, data: ImageSet):
        from .ud import layer_sharpness, sharpness_layers, subset

        pick = subset(data.labels, ud_samples, seed)
        x, y = data.images[pick], data.labels[pick]

        def on_epoch(epoch, model):
            sal.setdefault("layers", sharpness_layers(model))
            sal[which].append(layer_sharpness(model, x, y, seed=seed + epoch, **ud_opts).tolist())
        return on_epoch

    t_ud = 0.0
    victim = train_victim(train_set.images, train_set.labels, te.images, te.labels, len(tr.classes),
                          defense=get_defense(defense, **options), on_epoch=measure("protected", train_set) if ud
                          else None, **common)
    t_victim = time.perf_counter() - t0
    mi_ref = None
    if ud and ud_reference == "self":
        sal["clean"] = sal["protected"]
        ref = victim
    elif ud and ud_reference is not None:
        sal["clean"] = ud_reference["sal"]["clean"]
        theirs = {k: ud_reference["settings"].get(k) for k in ("samples", "iters", "rho", "seed")}
        if (len(sal["clean"]) != epochs or len(sal["clean"][0]) != len(sal["layers"])
                or theirs != {"samples": ud_samples, "iters": ud_iters, "rho": ud_rho, "seed": seed}):
            raise ValueError(f"ud_reference is of another run ({len(sal['clean'])} epochs, settings {theirs}): "
                             "its clean values are not this run's reference")
        ref = VictimResult(test_acc=list(ud_reference["clean_run"]["test_acc"]))
    elif ud:
        t1 = time.perf_counter()
        cl = base if base is not None else _clean_counterpart(train_dir, tr, clean, resize)
        ref = train_victim(cl.images, cl.labels, te.images, te.labels, len(cl.classes),
                           defense=get_defense(defense, **options), on_epoch=measure("clean", cl),
                           return_model=mi and defense == "none", **common)
        mi_ref = ref if mi and defense == "none" else None
        t_ud = time.perf_counter() - t1

    results = {
        "format": FORMAT,
        "ue_fast_version": __version__,
        "label": label or f"{train_dir.name if train_dir else 'train'} ({defense})",
        "train": str(train_dir) if train_dir else "ImageSet",
        "test": str(test) if not isinstance(test, ImageSet) else "ImageSet",
        "train_source": tr.origin,
        "num_train": len(tr), "num_test": len(te), "classes": tr.classes, "image_size": list(tr.image_size),
        "settings": dict(arch=arch, epochs=epochs, defense=defense, adv_eps_255=adv_eps if defense == "adv-train"
                         else None, adv_norm=adv_norm if defense == "adv-train" else None,
                         jpeg_quality=jpeg_quality if defense == "jpeg" else None, poison_ratio=poison_ratio,
                         batch_size=batch_size, optimizer=rec["optimizer"], lr=lr, weight_decay=weight_decay, seed=seed,
                         momentum=rec.get("momentum"), augmentation="crop 4 px padding + horizontal flip",
                         schedule="cosine"),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "versions": {"ue_fast": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "test_acc": victim.test_acc, "train_acc": victim.train_acc,
        "best": victim.best, "last": victim.last,
        "timings_s": {"victim": t_victim},
    }
    if poison_ratio is not None:
        results["poison_ratio"] = partial or {"ratio": poison_ratio, "protected": len(tr), "clean": 0, "seed": seed,
                                              "clean_part": None}
    if ud:
        from .ud import BATCH_SIZE, LR, unlearnable_distance

        results["ud"] = {**unlearnable_distance(torch.tensor(sal["protected"]), torch.tensor(sal["clean"])),
                         "settings": {"samples": ud_samples, "iters": ud_iters, "rho": ud_rho, "lr": LR,
                                      "batch_size": BATCH_SIZE, "seed": seed},
                         "clean_run": {"test_acc": ref.test_acc, "best": ref.best, "last": ref.last},
                         "layers": sal.pop("layers"), "sal": sal}
        results["timings_s"]["ud_clean_run"] = t_ud
    if mi:
        from ..metrics import mi_report

        t1 = time.perf_counter()
        cl = base if base is not None else _clean_counterpart(train_dir, tr, clean, resize)
        ref = mi_ref or train_victim(cl.images, cl.labels, te.images, te.labels, len(cl.classes), return_model=True,
                                     **common)
        results["mi"] = mi_report(ref.model, cl.images, tr.images, tr.labels, len(tr.classes), device=dev)
        results["mi"]["reference_model_test_acc"] = ref.last
        results["timings_s"]["mi"] = time.perf_counter() - t1
    results["timings_s"]["total"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, results)
        if plot:
            from .plot import plot_curves

            plot_curves([results], out.with_suffix(".png"))
    return results


def load_results(path) -> dict:
    """A results JSON written by ``evaluate``; ValueError for another format or version."""
    path = Path(path)
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read results file {path}: {e}") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != FORMAT:
        raise ValueError(f"{path} is not a results file of this version of ue_fast evaluate "
                         f"(format {fmt!r}, expected {FORMAT!r}); re-run `ue-fast evaluate`")
    return doc
