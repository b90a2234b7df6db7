"""The generator ``protect`` runs: a method's config from its preset and the settings given,
with the wrappers (``Sparse``, ``Robust``) it asks for."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..checkpoint import load_checkpoint
from ..generation.placement import check_delta_dtype
from ..run_folder import CHECKPOINT_DIR
from .robust import Robust
from .salm import Sparse


def build_generator(cls, method: str, eps, overrides: dict, settings: dict, *, preset, resume: bool, output_dir: Path,
            store: str, delta_dtype: str, sparse, robust=None, robust_settings=None):
    """``protect``'s generator for ``method`` (``cls``): its config (the preset, then ``overrides``
    and ``settings``), made ``Sparse`` and ``Robust`` when asked, and the budget in 1/255, every
    setting checked before anything is read or written. On ``resume`` a keyed method takes the
    interrupted run's key from its checkpoint."""
    if eps is not None and not cls.lp:
        raise ValueError(f"method {method!r} is not an L-inf perturbation: eps does not apply "
                         f"({cls.config_class.__name__}'s settings bound its change)")
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(k for k, v in {**overrides, **settings}.items() if k not in names and v is not None)
    if unknown:
        raise ValueError(f"method {method!r} has no setting(s) {unknown}; its settings: {sorted(names)}")
    if eps is not None:
        overrides["eps"] = eps / 255
    chosen = {**(cls.preset(preset) if preset is not None else {}),
              **{k: v for k, v in overrides.items() if v is not None}, **settings}
    if cls.keyed and chosen.get("seed") is None and resume:  # the interrupted run's key, kept in its checkpoint
        saved = output_dir / CHECKPOINT_DIR / "checkpoint.pt"
        if saved.exists():
            chosen["seed"] = load_checkpoint(saved)["settings"]["seed"]
    cfg = cls.config_class(**chosen)
    check_delta_dtype(delta_dtype, cfg.eps)
    if cls.lp and cfg.eps * 255 < 1 - 1e-6:
        raise ValueError(f"eps {cfg.eps * 255:g}/255 is below one grey level: an 8-bit image cannot change by "
                         "less than 1/255, so no pixel of the output could differ from its input. Use eps >= 1 "
                         "(units of 1/255; the field's budget is 8)")
    if store == "disk" and not cls.streams:
        raise ValueError(f"method {method!r} needs its images and perturbations in memory ({cls.streams_why}); "
                         "run it with --store memory or auto")
    gen = cls(cfg)
    if sparse is not None:
        gen = Sparse(gen, sparse)
    if robust is not None:
        gen = Robust(gen, robust, robust_settings)
    elif robust_settings:
        raise ValueError("robust settings are given without robust: name the defences to survive, e.g. "
                         "robust='jpeg,grayscale' (--robust jpeg,grayscale)")
    eps = round(cfg.eps * 255, 6)
    return gen, cfg, eps
