"""The results document of one evaluation: the curves, the clean/protected comparison with its
standard error, detection, and the settings and versions it was measured with."""
from __future__ import annotations

import math
import platform

import torch

from .. import __version__
from ..data import ImageSet
from .summary import FORMAT
from .victim import VictimResult


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


def _learner_settings(learner: str) -> dict:
    from .learners import settings

    return settings(learner)
