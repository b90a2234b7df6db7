"""``evaluate``'s arguments, refused before anything is read or trained."""
from __future__ import annotations

import os
from pathlib import Path

from ..devices import resolve_device
from ..models import ARCHS
from ..ops._checks import check_int
from ..outputs import check_output_file
from .defenses import DEFENSES, check_options


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
