"""``ue-fast report``: one protection measured the way the field does, in one table.

Every cell of victim x defence x poison ratio is an ``evaluate`` run on the protected
set, beside the clean reference of each victim x defence (a victim of the same recipe
and defence trained on the clean counterparts). With ``ud``, every run also measures
the unlearnable distance; each clean victim is trained once and is the reference of
the protected cells of its row.

The data are read once: the protected set (a ``protect`` output, or another tool's
poisons, an APBench folder or a ``poison.pt`` / ``.npy`` tensor, against the clean base
set), its clean counterparts and the clean test set. Each finished cell is written to
``OUT/cells/<name>.json`` at once, with a fingerprint of its settings and of the data;
a rerun reuses the cells whose fingerprint matches, so an interrupted report resumes
where it stopped. A clean cell's fingerprint leaves the protected set out: reports of
several protections against the same clean data share their clean cells when they are
copied into each other's ``cells/``. The outputs, rewritten after every cell:

- ``report.md``: per victim and defence, the clean accuracy, the protected accuracy and
  the gap at every ratio (and UD), last epoch;
- ``heatmap.png``: the gaps, one panel per ratio (defences x victims);
- ``report.json``: all of it, with every cell's per-epoch curves.

Gap: clean minus protected test accuracy, in points, at the last epoch. At a ratio
below 1 the comparison that matters is the mixed victim against the victim trained on
the clean part alone (a protection that works leaves the mixed victim no better), so
there the gap is clean part alone minus mixed.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from ..data import ImageSet, read_json, write_json_atomic
from ..data.poisons import kind_of
from ..devices import resolve_device
from ..models import ARCHS
from ..ops._checks import check_int
from ..outputs import check_not_held, check_output_folder, entries_besides_locks, hold
from ..progress import progress as _progress
from ..data.sources import STREAMED, find_source
from .defenses import DEFENSES, check_options
from .learners import LEARNERS
from .report_doc import FORMAT, _cell_name, _row, _write_outputs, robustness  # noqa: F401 (public here too)
from .run import _clean_counterpart, _detection, _load, _poisoned, evaluate

DEFAULT_ARCHS = ("resnet18",)
DEFAULT_DEFENSES = tuple(DEFENSES)
DEFAULT_RATIOS = (1.0,)


def _fingerprint(data: ImageSet) -> str:
    h = hashlib.sha256()
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.to(torch.int64).numpy().tobytes())
    h.update(repr(data.classes).encode())
    return h.hexdigest()[:16]


def _check_list(name: str, values, allowed) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"{name}: give at least one")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"unknown {name} {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: {values} names one twice")
    return values


def _check_ratios(ratios) -> tuple:
    ratios = tuple(ratios)
    if not ratios:
        raise ValueError("poison_ratios: give at least one")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"poison ratios are fractions in (0, 1] (0.5 for half), got {r!r}")
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"poison_ratios: {ratios} names one twice")
    return tuple(float(r) for r in ratios)


def load_sets(protected, clean, test, *, order=None, resize=None):
    """(protected, clean counterparts in the protected set's order, test) ImageSets and a description.

    Every protected/clean pair is checked against the protection's budget as ``evaluate`` checks
    it (``run._clean_counterpart`` / ``run._poisoned``, both through ``pairs.check_pairs``): a clean
    set that is not the protected set's counterpart is refused (a ValueError naming the files)
    before any cell trains. The description's ``pairs_checked`` is the check's record."""
    path = Path(protected)
    base = _load(clean, "clean", resize, "train", order)
    kind = kind_of(path) if path.exists() else None
    if kind in ("apbench", "tensor"):
        prot, cl = _poisoned(path, base)
    else:
        if not path.exists() and find_source(protected).name not in STREAMED:
            raise ValueError(f"protected set {path} does not exist")
        prot = _load(path, "protected", resize)
        cl = _clean_counterpart(None, prot, base, resize)
    te = _load(test, "test", resize, "test")
    if prot.classes != te.classes:
        raise ValueError(f"protected and test sets have different classes: {prot.classes} vs {te.classes}")
    if prot.image_size != te.image_size:
        raise ValueError(f"protected images are {prot.image_size}, test images {te.image_size}: pass resize")
    return prot, cl, te, {"kind": kind or "folder", "source": prot.origin,
                          "pairs_checked": (cl.origin or {}).get("pairs_checked")}


def report(protected, clean, test, out, *, archs=DEFAULT_ARCHS, defenses=DEFAULT_DEFENSES,
           poison_ratios=DEFAULT_RATIOS, epochs: int = 40, ud: bool = False, ud_samples: int | None = 2048,
           ud_iters: int = 10, ud_rho: float = 0.05, order=None, resize=None, device: str | None = None,
           seed: int = 0, batch_size: int = 128, lr: float | None = None, adv_eps: float = 8, adv_norm: str = "linf",
           jpeg_quality: int = 10, detect: bool = False, detect_epochs: int = 100, detect_model: str = "linear",
           learners=("supervised",), probe_epochs: int = 100, defense_options: dict | None = None,
           label: str | None = None,
           progress: bool = True) -> dict:
    """Run (or resume) every cell of the report and write ``out``/report.md, heatmap.png, report.json.

    protected: a ``protect`` output folder, or another tool's poisons (an APBench poison folder, a
    ``poison.pt`` / ``.npy``) against ``clean``. clean: the clean training set (the base set, in its own
    order, of another tool's poisons; ``order`` for an image folder). test: the clean test set.
    archs, defenses: victims and defences (``ue_fast.models.ARCHS``, ``DEFENSES``). poison_ratios:
    fractions in (0, 1] of the training set protected (``evaluate``'s ``poison_ratio``). lr: the peak
    learning rate of every victim (default: each architecture's recipe). detect: UDP's detection score
    of the protected set and of its clean counterparts, once per report (``evaluate``'s ``detect``,
    ``detect_epochs`` epochs of ``detect_model``; ``detection`` in report.json). learners: "supervised"
    (the victims under each defence) and contrastive learners ("simclr", "moco": ``evaluate``'s
    ``learner``, its probe ``probe_epochs`` epochs), each a row of its own per victim, with no other
    defence and at ratio 1 only. defense_options: ``{defence name: {option: value}}``, as ``evaluate``
    takes them for that defence (``{"dvae": {"epochs": 10}}``). The other arguments are
    ``evaluate``'s. Returns the report document (``report.json``).
    """
    t0 = time.perf_counter()
    archs, defenses, learners, defense_options, ratios = _check_arguments(
        archs, defenses, learners, defense_options, poison_ratios, epochs, probe_epochs, detect, detect_epochs,
        detect_model)
    contrastive = [k for k in learners if k != "supervised"]
    rows_keys = (list(defenses) if "supervised" in learners else []) + contrastive  # a row: a defence or a learner
    out = Path(out)
    _check_report_folder(out, {"protected set": protected, "clean set": clean, "test set": test, "order file": order})
    prot, cl, te, source = load_sets(protected, clean, test, order=order, resize=resize)
    out.mkdir(parents=True, exist_ok=True)
    with hold(out, "ue-fast report"):
        cells_dir = out / "cells"
        cells_dir.mkdir(parents=True, exist_ok=True)
        data = {"protected": _fingerprint(prot), "clean": _fingerprint(cl), "test": _fingerprint(te)}
        common = dict(epochs=epochs, device=device, seed=seed, batch_size=batch_size, lr=lr, adv_eps=adv_eps,
                      adv_norm=adv_norm, jpeg_quality=jpeg_quality, progress=progress, ud=ud, ud_samples=ud_samples,
                      ud_iters=ud_iters, ud_rho=ud_rho)
        shared = {"format": FORMAT, "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
                  "adv_eps": adv_eps, "adv_norm": adv_norm, "jpeg_quality": jpeg_quality, "data": data,
                  "ud": {"samples": ud_samples, "iters": ud_iters, "rho": ud_rho} if ud else None}
        plan = []
        for arch in archs:
            for key in rows_keys:
                plan.append(("clean", arch, key, None))
                plan += [("protected", arch, key, r) for r in ratios if key not in contrastive or r == 1]
        results: dict[str, dict] = {}
        detection = None
        if detect:  # one score per data set, not per cell: cached like a cell
            fp = {**shared, "set": "detect", "detect_epochs": detect_epochs, "detect_model": detect_model}
            detection = _read_cell(cells_dir / "detect.json", fp)
            if detection is None:
                detection = _detection(prot, cl, detect_epochs, seed, resolve_device(device), detect_model)
                write_json_atomic(cells_dir / "detect.json", {"fingerprint": fp, "results": detection})
        bar = _progress(len(plan), "report cells", "cell", enabled=progress, interval=0)
        reused = 0
        for kind, arch, defense, ratio in plan:
            name = _cell_name(kind, arch, defense, ratio)
            learner = defense if defense in contrastive else None
            fp = {**shared, "set": kind, "arch": arch, "defense": defense, "ratio": ratio}
            if learner:  # a learner's row: no defence, its own recipe
                fp.update(defense="none", learner=learner, probe_epochs=probe_epochs)
            elif defense in defense_options:
                fp["defense_options"] = defense_options[defense]
            if kind == "clean":  # a clean cell does not depend on the protected set: reports of several can share it
                fp["data"] = {k: v for k, v in data.items() if k != "protected"}
            doc = _read_cell(cells_dir / f"{name}.json", fp)
            if doc is not None:
                reused += 1
            else:
                doc = _run_cell(kind, arch, defense, ratio, learner, prot, cl, te, results, common=common,
                                options=defense_options.get(defense), probe_epochs=probe_epochs)
                write_json_atomic(cells_dir / f"{name}.json", {"fingerprint": fp, "results": doc})
            results[name] = doc
            bar.set_postfix(cell=name, reused=reused)
            bar.update(1)
            _write_outputs(out, results, archs, rows_keys, ratios, ud, source, shared, prot, cl, te, label,
                           complete=len(results) == len(plan), elapsed=time.perf_counter() - t0, detection=detection)
        bar.close()
        return read_json(out / "report.json")


def _check_arguments(archs, defenses, learners, defense_options, poison_ratios, epochs, probe_epochs, detect,
                     detect_epochs, detect_model):
    """The report's arguments, refused before anything is read or trained; every defence is built
    once (its options, its optional dependencies). (archs, defenses, learners, defense_options, ratios)."""
    archs = _check_list("archs", archs, ARCHS)
    defenses = _check_list("defenses", defenses, DEFENSES)
    learners = _check_list("learners", learners, LEARNERS)
    defense_options = dict(defense_options or {})
    for name in defense_options:
        if name not in defenses:
            raise ValueError(f"defense_options names {name!r}, which is not among the report's defenses "
                             f"({', '.join(defenses)})")
    for name in defenses:
        check_options(name, defense_options.get(name, {}))
    check_int("probe_epochs", probe_epochs, 1)
    ratios = _check_ratios(poison_ratios)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(detect, bool):
        raise ValueError(f"detect must be True or False, got {detect!r}")
    if detect:
        from .detect import check_settings as check_detect

        check_detect(detect_epochs, detect_model)
    return archs, defenses, learners, defense_options, ratios


def _run_cell(kind, arch, defense, ratio, learner, prot, cl, te, results, *, common, options, probe_epochs) -> dict:
    """Train one cell's victim (``evaluate``): the clean victim (its own UD reference), or the
    protected one at ``ratio`` (UD against the clean cell of the same row, computed before it)."""
    opts = dict(arch=arch, defense=defense, **common,
                label=f"{kind} {arch} {defense}" + ("" if ratio is None else f" ratio {ratio:g}"))
    if learner:
        opts.update(defense="none", learner=learner, probe_epochs=probe_epochs, ud=False)
    elif options is not None:
        opts["defense_options"] = options
    if opts["defense"] != "adv-train":
        opts.pop("adv_eps"), opts.pop("adv_norm")
    if opts["defense"] != "jpeg":
        opts.pop("jpeg_quality")
    if kind == "clean":
        return evaluate(cl, te, ud_reference="self" if opts["ud"] else None, **opts)
    ref = results[_cell_name("clean", arch, defense, None)].get("ud") if opts["ud"] else None
    return evaluate(prot, te, clean=cl, poison_ratio=None if ratio == 1 else ratio, ud_reference=ref, **opts)


def _read_cell(path: Path, fp: dict) -> dict | None:
    """The results cached at ``path`` when their fingerprint is ``fp``; None when absent, stale or damaged."""
    if not path.is_file():
        return None
    try:
        cached = read_json(path)
        return cached["results"] if cached.get("fingerprint") == fp else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_report_folder(out: Path, inputs: dict) -> None:
    """``out`` is new, empty, or an earlier report (its report.json, or cells of ours): a report never
    writes its report.md, report.json, heatmap.png or cells/ over a folder of the user's, inside
    an input data set, or beside another run on the same folder."""
    check_output_folder(out, {k: v for k, v in inputs.items() if isinstance(v, (str, os.PathLike))}, "out")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"out {out} exists and is not a folder")
    check_not_held(out)
    names = entries_besides_locks(out)
    if not names:
        return
    try:
        earlier = read_json(out / "report.json").get("format") == FORMAT if (out / "report.json").is_file() else False
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{out / 'report.json'} cannot be read ({e}): a damaged report; remove it yourself, or "
                         "choose another folder") from None
    if not earlier and not (out / "cells").is_dir():
        shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(f"out {out} is not empty and holds no earlier report (it holds {shown}): a report writes "
                         "report.md, report.json, heatmap.png and cells/ there; choose a new or empty folder")
