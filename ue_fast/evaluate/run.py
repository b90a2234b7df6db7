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

import time
from pathlib import Path

import torch

from ..data import ImageSet, write_json_atomic
from ..models import recipe
from .checks import _check_arguments
from .defenses import get_defense
from .document import _curve, _detection, _document, _verdict, gap_se  # noqa: F401 (gap_se: its home was here)
from .sets import _clean_counterpart, _load, _poisoned, _read_sets, protected_mask  # noqa: F401 (report's)
from .summary import FORMAT, load_results, summary_lines  # noqa: F401 (their home was here)
from .victim import VictimResult, train_victim


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
    train_set, partial = tr, None
    if partial_run:
        train_set, partial = _partial(tr, cl, te, poison_ratio, seed, get_defense(defense, **options), common)
    detection = None
    if detect:
        t1 = time.perf_counter()
        detection = _detection(train_set, cl, detect_epochs, seed, dev, detect_model)
        detection["seconds"] = time.perf_counter() - t1
    sal = {"protected": [], "clean": []}
    ud_opts = dict(samples=ud_samples, seed=seed, rho=ud_rho, iters=ud_iters)
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
                              defense=get_defense(defense, **options), label=what, **common,
                              on_epoch=_sharpness_hook(sal, "protected", train_set, **ud_opts) if ud else None)
    t_victim = time.perf_counter() - t0
    ref = _clean_reference(
        partial=partial, ud=ud, ud_reference=ud_reference, reference=reference, mi=mi, defense=defense,
        contrastive=contrastive, victim=victim, sal=sal, ud_opts=ud_opts, epochs=epochs, cl=cl, te=te,
        defend=lambda: get_defense(defense, **options), learn=learn, common=common)
    results = _document(label=label, train_dir=train_dir, test=test, tr=tr, te=te, cl=cl, arch=arch, epochs=epochs,
                        defense=defense, adv_eps=adv_eps, adv_norm=adv_norm, jpeg_quality=jpeg_quality,
                        poison_ratio=poison_ratio, batch_size=batch_size, rec=rec, lr=lr, weight_decay=weight_decay,
                        seed=seed, learner=learner, defense_options=defense_options, dev=dev, victim=victim,
                        clean_ref=ref["clean_ref"], ref_from=ref["ref_from"], partial_run=partial_run, pairs=pairs,
                        detection=detection, contrastive=contrastive, probe_epochs=probe_epochs, t_victim=t_victim)
    if ref["t_ref"] is not None:
        results["timings_s"]["reference"] = ref["t_ref"]
    if poison_ratio is not None:
        results["poison_ratio"] = partial or {"ratio": poison_ratio, "protected": len(tr), "clean": 0, "seed": seed,
                                              "clean_part": None}
    _add_ud_mi(results, ud=ud, mi=mi, sal=sal, ref=ref["ud_run"], mi_ref=ref["mi_ref"], cl=cl, tr=tr, te=te,
               ud_samples=ud_samples, ud_iters=ud_iters, ud_rho=ud_rho, seed=seed, t_ud=ref["t_ud"], common=common,
               dev=dev)
    results["timings_s"]["total"] = time.perf_counter() - t0
    if out is not None:
        _write(Path(out), results, plot)
    return results


def _partial(tr: ImageSet, cl: ImageSet, te: ImageSet, ratio: float, seed: int, defense, common: dict):
    """Partial protection: (the training set with a seeded, class-balanced ``ratio`` of it
    protected and the rest its clean counterparts, the ``poison_ratio`` record with the curve of
    the victim trained on the clean part alone, the reference the mix must be compared to)."""
    mask = protected_mask(tr.labels, len(tr.classes), ratio, seed)
    mixed = ImageSet(torch.where(mask[:, None, None, None], tr.images, cl.images), tr.labels, tr.classes, tr.paths,
                     origin=tr.origin)
    keep = (~mask).nonzero()[:, 0]
    part_ref = train_victim(cl.images[keep], cl.labels[keep], te.images, te.labels, len(tr.classes),
                            defense=defense, label="on the clean part alone", **common)
    return mixed, {"ratio": ratio, "protected": int(mask.sum()), "clean": len(keep), "seed": seed,
                   "clean_part": _curve(part_ref)}


def _sharpness_hook(sal: dict, which: str, data: ImageSet, *, samples, seed, rho, iters):
    """An ``on_epoch`` hook appending UD's per-layer sharpness of the victim, on a seeded,
    class-balanced subset of ``data``, to ``sal[which]`` after every epoch."""
    from .ud import layer_sharpness, sharpness_layers, subset

    pick = subset(data.labels, samples, seed)
    x, y = data.images[pick], data.labels[pick]

    def on_epoch(epoch, model):
        sal.setdefault("layers", sharpness_layers(model))
        sal[which].append(layer_sharpness(model, x, y, seed=seed + epoch, rho=rho, iters=iters).tolist())
    return on_epoch


def _clean_reference(*, partial, ud, ud_reference, reference, mi, defense, contrastive, victim, sal, ud_opts, epochs,
                     cl, te, defend, learn, common) -> dict:
    """The clean side of the comparison, trained at most once: ``clean_ref`` (a curve) and
    ``ref_from`` (which run it is), UD's clean run ``ud_run``, the MI reference model ``mi_ref``
    and the seconds they took. In order of preference: the clean part of a partial protection,
    UD's clean run (the victim itself for ``ud_reference="self"``, an earlier run's, or one trained
    here), else a victim of the same recipe and defence on the clean counterparts."""
    got = {"clean_ref": None, "ref_from": None, "ud_run": None, "mi_ref": None, "t_ud": 0.0, "t_ref": None}
    if partial is not None:
        got.update(clean_ref=partial["clean_part"], ref_from="poison_ratio's victim trained on the clean part alone")
    if ud and ud_reference == "self":
        sal["clean"] = sal["protected"]
        got["ud_run"] = victim
        if reference and got["clean_ref"] is None:
            got.update(clean_ref=_curve(victim),
                       ref_from="the victim itself (ud_reference='self': the training set is clean)")
    elif ud and ud_reference is not None:
        sal["clean"] = ud_reference["sal"]["clean"]
        theirs = {k: ud_reference["settings"].get(k) for k in ("samples", "iters", "rho", "seed")}
        ours = {k: ud_opts[k] for k in ("samples", "iters", "rho", "seed")}
        if len(sal["clean"]) != epochs or len(sal["clean"][0]) != len(sal["layers"]) or theirs != ours:
            raise ValueError(f"ud_reference is of another run ({len(sal['clean'])} epochs, settings {theirs}): "
                             "its clean values are not this run's reference")
        run = VictimResult(test_acc=list(ud_reference["clean_run"]["test_acc"]))
        run.diverged = ud_reference["clean_run"].get("diverged")
        got["ud_run"] = run
        if got["clean_ref"] is None:
            got.update(clean_ref={"test_acc": run.test_acc, "best": run.best, "last": run.last,
                                  "peak_accuracy": run.best, "peak_epoch": run.peak_epoch, "diverged": run.diverged},
                       ref_from="the clean run of ud_reference (same recipe and defence)")
    elif ud:
        t1 = time.perf_counter()
        run = train_victim(cl.images, cl.labels, te.images, te.labels, len(cl.classes), defense=defend(),
                           on_epoch=_sharpness_hook(sal, "clean", cl, **ud_opts),
                           return_model=mi and defense == "none", label="on the clean counterparts", **common)
        got.update(ud_run=run, mi_ref=run if mi and defense == "none" else None, t_ud=time.perf_counter() - t1)
        if got["clean_ref"] is None:
            got.update(clean_ref=_curve(run), ref_from="ud's clean run (same recipe and defence)")
    if got["clean_ref"] is None and (reference or (mi and defense == "none")):
        # mi's reference model is trained with no defence: with defense "none" it is this recipe's
        # clean victim, trained once for both
        t1 = time.perf_counter()
        if contrastive:
            run = learn(cl.images, "on the clean counterparts")
        else:
            run = train_victim(cl.images, cl.labels, te.images, te.labels, len(cl.classes), defense=defend(),
                               return_model=mi and defense == "none", label="on the clean counterparts", **common)
        got.update(clean_ref=_curve(run), mi_ref=run if mi and defense == "none" else None,
                   ref_from="a victim of the same recipe and defence on the clean counterparts",
                   t_ref=time.perf_counter() - t1)
    return got


def _write(out: Path, results: dict, plot: bool) -> None:
    """The results JSON at ``out`` (atomically) and, with ``plot``, the curves beside it (.png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    if plot:
        from .plot import plot_curves

        plot_curves([results], out.with_suffix(".png"))




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


