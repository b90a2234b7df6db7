"""``evaluate``: how well does a (protected) training folder resist training?

Trains a victim on the training images with the standard recipe (``train_victim``),
optionally under a defence, and reports the clean test accuracy after every
epoch; with ``mi=True`` also the feature statistics of ``ue_fast.metrics`` (MI
gap, intra-class cosine, covariance trace) from a model trained on the clean
counterparts of the protected images. Results are a JSON document (``FORMAT``)
and a PNG plot of the accuracy curves (``ue_fast.evaluate.plot``).

Three guards keep a number from meaning what it does not:

- clean counterparts are checked pair by pair against the protection's budget before any of
  them is used (``ue_fast.evaluate.pairs``; the results' ``pairs_checked``);
- a diverged victim (``ue_fast.evaluate.victim.divergence``) is marked (``diverged``) and
  warned about, not reported as a protection;
- with a clean reference (``reference=True``, or a clean victim trained anyway by ``mi``,
  ``ud`` or ``poison_ratio``) the results carry clean and protected accuracy side by side with
  the gap and its standard error (``comparison``); :func:`summary_lines` prints them.
"""
from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import torch

from .. import __version__
from ..data import ImageSet, read_json, write_json_atomic
from ..data.canonical import detect, read_dataset
from ..data.sources import STREAMED, find_source
from ..ops._checks import check_int
from ..data.poisons import kind_of, load_poisoned
from ..devices import resolve_device
from ..models import ARCHS, recipe
from ..outputs import check_output_file, warn_nested_outputs
from .defenses import DEFENSES, check_options, get_defense
from .pairs import check_pairs
from .victim import VictimResult, train_victim

from .summary import FORMAT, load_results, summary_lines  # noqa: E402,F401 (their home was here)


def _load(source, what: str, resize, split: str = "train", order=None) -> ImageSet:
    if isinstance(source, ImageSet):
        return source
    if find_source(source).name in STREAMED:  # shards, tables, LMDB: read through their source
        return read_dataset(source, split, order=order, resize=resize)
    path = Path(source)
    if not path.is_dir() and detect(path) is None:
        raise ValueError(f"{what} folder {path} does not exist or is not a folder (or a data set: "
                         "cifar-10-batches-py/, cifar-100-python/, an SVHN .mat, a .npz)")
    if detect(path) is None:
        warn_nested_outputs(path, f"{what} folder")
    return read_dataset(path, split, order=order, resize=resize)


def _clean_counterpart(train_dir: Path | None, protected: ImageSet, clean, resize) -> ImageSet:
    """The clean images of a protected set, in the protected set's order, checked pair by pair.

    ``clean``: a folder (or ImageSet) with the same relative paths up to the file
    extension (protect() writes ``cat/0001.jpg`` as ``cat/0001.png``); None reads the
    input folder recorded in ``train_dir/manifest.json``. Every pair is checked against the
    protection's budget (``ue_fast.evaluate.pairs.check_pairs``: ``PairMismatchError``, a
    ValueError, when the images are not the protected ones' counterparts); the returned set's
    ``origin["pairs_checked"]`` is the check's record.
    """
    what = "--clean"
    if clean is None:
        manifest = train_dir / "manifest.json" if train_dir is not None else None
        if manifest is None or not manifest.is_file():
            raise ValueError("mi, ud, poison_ratio and reference need the clean images: pass clean=DIR (--clean DIR); "
                             "the training folder has no manifest.json from `ue-fast protect` naming its input")
        doc = read_json(manifest)
        # "input" is the path as typed (maybe relative to where protect ran); "input_abs" is resolved.
        src = doc.get("input_abs") or doc.get("input")
        if not src or src == "arrays" or not (Path(src).is_dir() or detect(src) is not None):
            raise ValueError(f"the manifest of {train_dir} names input {src!r}, which is not a folder here: "
                             "pass clean=DIR (--clean DIR)")
        clean = src
        what = f"the input {src} that the manifest names (changed since protect?)"
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
    out = ImageSet(images=data.images[idx], labels=data.labels[idx], classes=data.classes,
                   paths=[data.paths[i] for i in idx.tolist()], origin=dict(data.origin or {}))
    out.origin["pairs_checked"] = check_pairs(protected, out, path=train_dir, what=what)
    return out


def _poisoned(path: Path, base: ImageSet) -> tuple[ImageSet, ImageSet]:
    """Another tool's poisons at ``path`` against the clean ``base`` set: (protected, clean), the
    pairs checked (``check_pairs``); the clean set's ``origin["pairs_checked"]`` is the record."""
    tr = load_poisoned(path, base)
    record = check_pairs(tr, base, path=path, what="the clean base set (--clean)")
    cl = ImageSet(base.images, base.labels, base.classes, base.paths, origin={**(base.origin or {}),
                                                                              "pairs_checked": record})
    return tr, cl


def gap_se(clean_acc: float, protected_acc: float, n: int) -> float:
    """Standard error of ``clean_acc - protected_acc``, two accuracies each measured on the same
    ``n`` test images: ``sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)``, the binomial standard errors of
    the two combined as if independent. The two victims' errors on shared images usually
    correlate positively, which makes the true SE of the difference smaller: this one is then
    conservative (a paired, McNemar-style SE would need every image's predictions, not kept)."""
    if n <= 0:
        return float("nan")
    return math.sqrt(clean_acc * (1 - clean_acc) / n + protected_acc * (1 - protected_acc) / n)


def _finite(v):
    return v if v is None or math.isfinite(v) else None


def _verdict(v: dict | None) -> dict | None:
    """A divergence verdict for JSON (a non-finite loss written as null)."""
    return None if v is None else {k: _finite(x) if isinstance(x, float) else x for k, x in v.items()}


def _curve(r: VictimResult, **extra) -> dict:
    return {"test_acc": r.test_acc, "train_acc": r.train_acc, "best": r.best, "last": r.last,
            "peak_accuracy": r.best, "peak_epoch": r.peak_epoch, "train_loss": [_finite(x) for x in r.train_loss],
            "diverged": _verdict(r.diverged), **extra}


def _comparison(clean: dict, protected: VictimResult, n_test: int, reference: str, source: str) -> dict:
    """Clean and protected accuracy side by side (last epoch), the gap and its SE (:func:`gap_se`)."""
    p1, p2 = clean["last"], protected.last
    q1, q2 = clean["best"], protected.best  # the peaks: what stopping early at the best epoch would keep
    diverged = [k for k, v in (("clean", clean.get("diverged")), ("protected", protected.diverged)) if v]
    return {"reference": reference, "from": source, "n_test": n_test,
            "clean": clean, "protected": {"best": protected.best, "last": p2, "peak_accuracy": q2,
                                          "peak_epoch": protected.peak_epoch, "diverged": _verdict(protected.diverged)},
            "gap": None if diverged else p1 - p2, "gap_se": gap_se(p1, p2, n_test), "diverged": diverged or None,
            "peak_gap": None if diverged else q1 - q2, "peak_gap_se": gap_se(q1, q2, n_test),
            "se_formula": "sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n), n test images (conservative: both victims are "
                          "tested on the same images)"}


def _detection(train_set: ImageSet, clean: ImageSet | None, epochs: int, seed: int, device,
               model: str = "linear") -> dict:
    """UDP's detection score of the training set and, when known, of its clean counterparts."""
    from .detect import detection_score

    opts = {"epochs": epochs, "seed": seed, "device": device, "model": model}
    out = {"protected": detection_score(train_set.images, train_set.labels, **opts)}
    out["clean"] = None if clean is None else detection_score(clean.images, clean.labels, **opts)
    out["difference"] = None if clean is None else out["protected"]["score"] - out["clean"]["score"]
    return out


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


def _read_sets(train, test, clean, order, resize):
    """(the training folder or None, the training set, its clean counterparts when another tool's
    poisons brought them (else None), the test set), checked to share classes and image size."""
    train_dir = None if isinstance(train, ImageSet) else Path(train)
    cl = None  # the clean counterparts of tr, in its order, checked pair by pair
    if train_dir is not None and kind_of(train_dir) in ("apbench", "tensor"):
        if clean is None:
            raise ValueError(f"{train_dir} holds another tool's poisons ({kind_of(train_dir)}): pass the clean base set "
                             "they were made from, in its own order (clean=..., --clean CIFAR_DIR or --clean FOLDER "
                             "--order FILE)")
        tr, cl = _poisoned(train_dir, _load(clean, "clean base", resize, "train", order))
    else:
        if train_dir is not None and not train_dir.exists() and find_source(train).name not in STREAMED:
            raise ValueError(f"training folder {train_dir} does not exist")
        tr = _load(train, "training", resize)
    te = _load(test, "test", resize, "test")
    if tr.classes != te.classes:
        raise ValueError(f"training and test folders have different classes: {tr.classes} vs {te.classes}")
    if tr.image_size != te.image_size:
        raise ValueError(f"training images are {tr.image_size}, test images {te.image_size}: pass resize")
    return train_dir, tr, cl, te


def _check_arguments(*, train, test, clean, order, arch, defense, epochs, lr, weight_decay, adv_eps, adv_norm,
                     jpeg_quality, ud, ud_rho, ud_iters, ud_samples, poison_ratio, device, out, plot, reference,
                     defense_options, detect, detect_epochs, detect_model, learner, probe_epochs, mi):
    """Refuse a bad argument before anything is read or trained; (device, out, contrastive)."""
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
    dev = resolve_device(device)
    if out is not None:  # before a victim is trained: never over an input, never two outputs one name
        out = Path(out)
        inputs = {"training set": train, "test set": test, "clean set": clean, "order file": order}
        inputs = {k: v for k, v in inputs.items() if isinstance(v, (str, os.PathLike))}
        check_output_file(out, inputs, "out", kind="json", suffixes=(".json",),
                          others={"curves": out.with_suffix(".png") if plot else None})
        if plot:
            check_output_file(out.with_suffix(".png"), inputs, "the curves (out's .png)", kind="png")
    if not isinstance(reference, bool):
        raise ValueError(f"reference must be True or False, got {reference!r}")
    check_options(defense, {} if defense_options is None else defense_options)  # built once before anything trains (options, optional dependencies)
    if defense_options:
        clash = sorted({"eps", "norm", "quality"} & set(defense_options))
        if clash and defense in ("adv-train", "jpeg"):
            raise ValueError(f"give {', '.join(clash)} of {defense!r} with adv_eps/adv_norm/jpeg_quality "
                             "(--adv-eps, --adv-norm, --jpeg-quality), not as a defense option")
    if not isinstance(detect, bool):
        raise ValueError(f"detect must be True or False, got {detect!r}")
    from .learners import LEARNERS

    if learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r}; choose one of {', '.join(LEARNERS)}")
    contrastive = learner != "supervised"
    if contrastive:
        check_int("probe_epochs", probe_epochs, 1)
        clash = [n for n, on in (("defense " + repr(defense), defense != "none"), ("mi", mi), ("ud", ud),
                                 ("poison_ratio", poison_ratio is not None)) if on]
        if clash:
            raise ValueError(f"learner {learner!r} runs without {', '.join(clash)}: a contrastive learner and its "
                             "probe are their own training recipe (run the supervised victim for those)")
    if detect:
        from .detect import check_settings as check_detect

        check_detect(detect_epochs, detect_model)
    return dev, out, contrastive


def evaluate(train, test, *, arch: str = "resnet18", epochs: int = 40, defense: str = "none",
             adv_eps: float = 8, adv_norm: str = "linf", jpeg_quality: int = 10, batch_size: int = 128,
             lr: float | None = None, weight_decay: float | None = None,
             device: str | None = None, seed: int = 0, resize=None, mi: bool = False, clean=None,
             order=None, poison_ratio: float | None = None, ud: bool = False, ud_samples: int | None = 2048,
             ud_iters: int = 10, ud_rho: float = 0.05, ud_reference=None, out=None, plot: bool = True,
             progress: bool = True, reference: bool = False, detect: bool = False, detect_epochs: int = 100,
             detect_model: str = "linear", learner: str = "supervised", probe_epochs: int = 100,
             defense_options: dict | None = None,
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
            for a protected folder, its clean counterparts (for ``mi``, ``ud``, ``poison_ratio`` and
            ``reference``; None reads the input its manifest names when one of those needs them).
            Whenever clean counterparts are read, every pair is checked against the protection's
            budget first (``ue_fast.evaluate.pairs.check_pairs``): a clean set that is not the
            protected set's counterpart (shuffled, another set) is refused with a ValueError naming
            the files; the results' ``pairs_checked`` says what was checked and what was not.
        reference: also train a victim of the same recipe and defence on the clean counterparts and
            report clean and protected accuracy side by side (``comparison``). A second training
            run, so off by default; a clean victim that ``ud`` (or ``ud_reference``), ``mi`` (without
            a defence) or ``poison_ratio`` trains anyway is used instead of training another, and
            gives a ``comparison`` without ``reference``. With ``poison_ratio`` below 1 the reference
            is the victim trained on the clean part alone.
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
        defense_options: more options of ``defense``, as ``get_defense`` takes them
            (``{"epochs": 10}`` for dvae); refused before anything is read when the defence has no
            such option or the value is bad.
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
        detect: also UDP's detection score (``ue_fast.evaluate.detect``): a simple network
            (``detect_model``: "linear", or the authors' default "2nn", which needs their full-scale
            schedule) trained ``detect_epochs`` epochs on 80% of the training set (as the victim sees
            it), its accuracy on the other 20%; above 0.7 the paper calls the set detected. With clean counterparts
            (``clean``, or the input a protect manifest names) the same on them, for comparison.
            Results in ``detect``.
        learner: "supervised" (the victim above), or "simclr" / "moco": a contrastive learner
            (``ue_fast.evaluate.learners``, APBench's) pretrained ``epochs`` epochs on the training
            images without their labels, then a linear probe trained ``probe_epochs`` epochs on its
            frozen features of the clean counterparts (when known; else of the training set): the
            curves are the probe's. Not with a defence, ``mi``, ``ud`` or ``poison_ratio``. Results
            in ``learner``.
        out: write the results JSON there (and, with ``plot``, the curves beside it as .png).
        label: the run's name in plots (default: the training folder's name and the defence).

    Returns the results document: per-epoch ``test_acc`` / ``train_acc`` / ``train_loss``,
    ``best``, ``last`` (fractions), settings, versions, timings and ``mi`` when asked for; also

    - ``diverged``: None, or when and why the victim diverged (``ue_fast.evaluate.victim.divergence``:
      a non-finite training loss, or a last epoch's loss above 10 x max(first batch's loss, ln C));
      a ``DivergenceWarning`` says so as well. A diverged victim's accuracy measures nothing.
    - ``comparison``: None, or with a clean reference: ``clean`` and ``protected`` accuracy (last
      epoch), ``gap`` (clean minus protected; None when either run diverged), ``gap_se`` (its
      standard error over the ``n_test`` test images, :func:`gap_se`: ``sqrt(p1 (1 - p1) / n +
      p2 (1 - p2) / n)``), and which run the reference is.
    - ``pairs_checked``: None when no clean counterparts were read, else the record of
      ``check_pairs``: ``count``, ``max_linf_255``, ``budget``, ``bound_255``, ``source``,
      ``checked``, ``not_checked``.

    :func:`summary_lines` turns the document into the lines to print.
    """
    t0 = time.perf_counter()
    dev, out, contrastive = _check_arguments(
        train=train, test=test, clean=clean, order=order, arch=arch, defense=defense, epochs=epochs, lr=lr,
        weight_decay=weight_decay, adv_eps=adv_eps, adv_norm=adv_norm, jpeg_quality=jpeg_quality, ud=ud,
        ud_rho=ud_rho, ud_iters=ud_iters, ud_samples=ud_samples, poison_ratio=poison_ratio, device=device, out=out,
        plot=plot, reference=reference, defense_options=defense_options, detect=detect, detect_epochs=detect_epochs,
        detect_model=detect_model, learner=learner, probe_epochs=probe_epochs, mi=mi)
    train_dir, tr, cl, te = _read_sets(train, test, clean, order, resize)
    rec = recipe(arch)
    lr = rec["lr"] if lr is None else lr
    weight_decay = rec["weight_decay"] if weight_decay is None else weight_decay
    options = {**{"adv-train": {"eps": adv_eps / 255, "norm": adv_norm},
                  "jpeg": {"quality": jpeg_quality}}.get(defense, {}), **(defense_options or {})}
    common = dict(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                  device=dev, progress=progress)
    partial_run = poison_ratio is not None and poison_ratio < 1
    reuses_ud = ud and ud_reference is not None  # the clean side comes from ud_reference: no clean images needed
    if cl is None and (clean is not None or mi or (ud and ud_reference is None) or partial_run
                       or (reference and not reuses_ud)
                       or ((detect or contrastive) and train_dir is not None
                           and (train_dir / "manifest.json").is_file())):
        cl = _clean_counterpart(train_dir, tr, clean, resize)
    pairs = cl.origin.get("pairs_checked") if cl is not None else None
    partial, train_set, part_ref = None, tr, None
    if partial_run:
        mask = protected_mask(tr.labels, len(tr.classes), poison_ratio, seed)
        train_set = ImageSet(torch.where(mask[:, None, None, None], tr.images, cl.images), tr.labels, tr.classes,
                             tr.paths, origin=tr.origin)
        keep = (~mask).nonzero()[:, 0]
        part_ref = train_victim(cl.images[keep], cl.labels[keep], te.images, te.labels, len(tr.classes),
                                defense=get_defense(defense, **options), label="on the clean part alone", **common)
        partial = {"ratio": poison_ratio, "protected": int(mask.sum()), "clean": len(keep), "seed": seed,
                   "clean_part": _curve(part_ref)}
    detection = None
    if detect:
        t1 = time.perf_counter()
        detection = _detection(train_set, cl, detect_epochs, seed, dev, detect_model)
        detection["seconds"] = time.perf_counter() - t1
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
    what = f"on {label or (train_dir.name if train_dir else 'the training set')}"
    probe = cl if cl is not None else train_set  # APBench probes on the clean training set

    def learn(images: torch.Tensor, on: str):
        from .learners import train_learner

        return train_learner(learner, images, probe.images, probe.labels, te.images, te.labels, len(tr.classes),
                             arch=arch, epochs=epochs, probe_epochs=probe_epochs, seed=seed, device=dev,
                             progress=progress, label=on)

    if contrastive:
        victim = learn(train_set.images, what)
    else:
        victim = train_victim(train_set.images, train_set.labels, te.images, te.labels, len(tr.classes),
                              defense=get_defense(defense, **options), on_epoch=measure("protected", train_set) if ud
                              else None, label=what, **common)
    t_victim = time.perf_counter() - t0
    mi_ref = None
    clean_ref, ref_from = None, None  # the clean reference of `comparison`: a curve dict, and which run it is
    if partial_run:
        clean_ref, ref_from = partial["clean_part"], "poison_ratio's victim trained on the clean part alone"
    if ud and ud_reference == "self":
        sal["clean"] = sal["protected"]
        ref = victim
        if reference and clean_ref is None:
            clean_ref, ref_from = _curve(victim), "the victim itself (ud_reference='self': the training set is clean)"
    elif ud and ud_reference is not None:
        sal["clean"] = ud_reference["sal"]["clean"]
        theirs = {k: ud_reference["settings"].get(k) for k in ("samples", "iters", "rho", "seed")}
        if (len(sal["clean"]) != epochs or len(sal["clean"][0]) != len(sal["layers"])
                or theirs != {"samples": ud_samples, "iters": ud_iters, "rho": ud_rho, "seed": seed}):
            raise ValueError(f"ud_reference is of another run ({len(sal['clean'])} epochs, settings {theirs}): "
                             "its clean values are not this run's reference")
        ref = VictimResult(test_acc=list(ud_reference["clean_run"]["test_acc"]))
        ref.diverged = ud_reference["clean_run"].get("diverged")
        if clean_ref is None:
            clean_ref = {"test_acc": ref.test_acc, "best": ref.best, "last": ref.last, "peak_accuracy": ref.best,
                         "peak_epoch": ref.peak_epoch, "diverged": ref.diverged}
            ref_from = "the clean run of ud_reference (same recipe and defence)"
    elif ud:
        t1 = time.perf_counter()
        ref = train_victim(cl.images, cl.labels, te.images, te.labels, len(cl.classes),
                           defense=get_defense(defense, **options), on_epoch=measure("clean", cl),
                           return_model=mi and defense == "none", label="on the clean counterparts", **common)
        mi_ref = ref if mi and defense == "none" else None
        t_ud = time.perf_counter() - t1
        if clean_ref is None:
            clean_ref, ref_from = _curve(ref), "ud's clean run (same recipe and defence)"
    t_ref = None
    if clean_ref is None and (reference or (mi and defense == "none")):
        # mi's reference model is trained with no defence: with defense "none" it is this recipe's
        # clean victim, trained once for both
        t1 = time.perf_counter()
        if contrastive:
            mi_ref = learn(cl.images, "on the clean counterparts")
        else:
            mi_ref = train_victim(cl.images, cl.labels, te.images, te.labels, len(cl.classes),
                                  defense=get_defense(defense, **options), return_model=mi and defense == "none",
                                  label="on the clean counterparts", **common)
        clean_ref, ref_from = _curve(mi_ref), "a victim of the same recipe and defence on the clean counterparts"
        mi_ref = mi_ref if mi and defense == "none" else None
        t_ref = time.perf_counter() - t1

    results = _document(label=label, train_dir=train_dir, test=test, tr=tr, te=te, cl=cl, arch=arch, epochs=epochs,
                        defense=defense, adv_eps=adv_eps, adv_norm=adv_norm, jpeg_quality=jpeg_quality,
                        poison_ratio=poison_ratio, batch_size=batch_size, rec=rec, lr=lr, weight_decay=weight_decay,
                        seed=seed, learner=learner, defense_options=defense_options, dev=dev, victim=victim,
                        clean_ref=clean_ref, ref_from=ref_from, partial_run=partial_run, pairs=pairs,
                        detection=detection, contrastive=contrastive, probe_epochs=probe_epochs, t_victim=t_victim)
    if t_ref is not None:
        results["timings_s"]["reference"] = t_ref
    if poison_ratio is not None:
        results["poison_ratio"] = partial or {"ratio": poison_ratio, "protected": len(tr), "clean": 0, "seed": seed,
                                              "clean_part": None}
    _add_ud_mi(results, ud=ud, mi=mi, sal=sal, ref=ref if ud else None, mi_ref=mi_ref, cl=cl, tr=tr, te=te,
               ud_samples=ud_samples, ud_iters=ud_iters, ud_rho=ud_rho, seed=seed, t_ud=t_ud, common=common, dev=dev)
    results["timings_s"]["total"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, results)
        if plot:
            from .plot import plot_curves

            plot_curves([results], out.with_suffix(".png"))
    return results


def _document(*, label, train_dir, test, tr, te, cl, arch, epochs, defense, adv_eps, adv_norm, jpeg_quality,
              poison_ratio, batch_size, rec, lr, weight_decay, seed, learner, defense_options, dev, victim, clean_ref,
              ref_from, partial_run, pairs, detection, contrastive, probe_epochs, t_victim) -> dict:
    """The results document of one evaluation, before the optional parts (ud, mi, poison_ratio)."""
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
                         schedule="cosine", learner=learner, defense_options=defense_options or None),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "versions": {"ue_fast": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "test_acc": victim.test_acc, "train_acc": victim.train_acc,
        "best": victim.best, "last": victim.last,
        "peak_accuracy": victim.best, "peak_epoch": victim.peak_epoch,
        "train_loss": [_finite(x) for x in victim.train_loss],
        "diverged": _verdict(victim.diverged),
        "comparison": None if clean_ref is None else _comparison(
            clean_ref, victim, len(te), "clean part alone" if partial_run else "clean counterparts", ref_from),
        "pairs_checked": pairs,
        "detect": detection,
        "learner": None if not contrastive else {
            "kind": learner, "pretrain_epochs": epochs, "pretrain_loss": [_finite(x) for x in victim.pretrain_loss],
            "probe_epochs": probe_epochs, "probe_on": "clean counterparts" if cl is not None else "training set",
            "settings": _learner_settings(learner)},
        "timings_s": {"victim": t_victim},
    }
    return results


def _add_ud_mi(results: dict, *, ud, mi, sal, ref, mi_ref, cl, tr, te, ud_samples, ud_iters, ud_rho, seed, t_ud,
               common, dev) -> None:
    """The unlearnable distance (``ud``) and the MI gap (``mi``) sections of the results."""
    if ud:
        from .ud import BATCH_SIZE, LR, unlearnable_distance

        results["ud"] = {**unlearnable_distance(torch.tensor(sal["protected"]), torch.tensor(sal["clean"])),
                         "settings": {"samples": ud_samples, "iters": ud_iters, "rho": ud_rho, "lr": LR,
                                      "batch_size": BATCH_SIZE, "seed": seed},
                         "clean_run": {"test_acc": ref.test_acc, "best": ref.best, "last": ref.last,
                                       "diverged": _verdict(ref.diverged)},
                         "layers": sal.pop("layers"), "sal": sal}
        results["timings_s"]["ud_clean_run"] = t_ud
    if mi:
        from ..metrics import mi_report

        t1 = time.perf_counter()
        ref = mi_ref or train_victim(cl.images, cl.labels, te.images, te.labels, len(cl.classes), return_model=True,
                                     label="on the clean counterparts (MI reference)", **common)
        results["mi"] = mi_report(ref.model, cl.images, tr.images, tr.labels, len(tr.classes), device=dev)
        results["mi"]["reference_model_test_acc"] = ref.last
        results["mi"]["reference_model_diverged"] = _verdict(ref.diverged)
        results["timings_s"]["mi"] = time.perf_counter() - t1


def _learner_settings(learner: str) -> dict:
    from .learners import settings

    return settings(learner)
