"""The record of a protect run (``manifest.json``): what was protected, how, with what result,
where it went; written last, its presence marks a complete output."""
from __future__ import annotations

import math
import platform
import sys
import time

import numpy as np
import torch

from . import __version__
from .generation.placement import default_memory_budget
from .methods import METHODS, SurrogateMethod


def _versions() -> dict:
    out = {"ue_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for name in ("triton", "PIL"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except Exception:
                continue
        out["pillow" if name == "PIL" else name] = getattr(mod, "__version__", "unknown")
    return out


def _budget_default():
    b = default_memory_budget()
    return None if math.isinf(b) else int(b)


def _manifest(*, method, cls, cfg, gen, eps, compile, sparse, delta_dtype, preset, key_file, dev, input_dir,
              output_dir, data, out, left_out, rounding, store, budget, ingest, dist, sync_bn, float64, profile,
              result, timings, t_start) -> dict:
    """The run's record (``manifest.json``): what was protected, how, with what result, where it went."""
    linf, written, npy_file = out["linf"], out["written"], out["npy_name"]
    gen_s = sum(h.get("train_s", 0.0) + h.get("poison_s", 0.0) for h in result.history)
    rounds = sum(1 for h in result.history if "epoch" in h)  # early-stopping methods run fewer than epochs
    budget_note = gen.budget()
    if cls.lp:
        budget_note["holds"] = int(linf.max()) <= math.floor(eps + 1e-6)
    key_note = None
    if cls.keyed:
        key_note = {"withheld": True, "key_file": str(key_file) if key_file is not None else None,
                    "why": "the seed is the method's private key: it regenerates the change, which helps undo it"}
    manifest = {
        "ue_fast_version": __version__,
        "method": method,
        "settings": {**cfg.to_dict(), **({"seed": None} if cls.keyed else {}), "eps_255": eps, "compile": compile,
                     "sparse": sparse, "robust": list(getattr(gen, "defences", ())) or None,
                     "robust_settings": gen.robust_settings.to_dict() if hasattr(gen, "robust_settings") else None,
                     "delta_dtype": delta_dtype, "preset": preset},
        "seed": None if cls.keyed else cfg.seed,
        "budget": budget_note,
        "key": key_note,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "versions": _versions(),
        "input": str(input_dir) if input_dir is not None else "arrays",
        "input_abs": str(input_dir.resolve()) if input_dir is not None else None,
        "dataset": data.origin or {"format": "arrays", "order": "index"},
        "output": str(output_dir),
        "num_images": len(data),
        "image_size": list(data.images.shape[2:]),
        "classes": data.classes,
        "counts": torch.bincount(data.labels, minlength=len(data.classes)).tolist(),
        "skipped": data.skipped,
        "ignored": data.ignored,
        "left_out": left_out,
        "alpha_kept": data.alpha is not None,
        "linf_max_255": int(linf.max()),
        "mean_abs_delta_255": out["mean_abs_255"],
        "changed_pixels_fraction": out["changed_fraction"],
        "unchanged_images": out["unchanged"],
        "rounding": rounding,
        "delta_store": {"dtype": str(gen.store.dtype).removeprefix("torch."), "on": gen.store.where,
                        "images_on": "disk" if gen.data.on_disk else str(gen.data.place), "store": store,
                        "memory_budget_bytes": budget if budget is not None else _budget_default()},
        "ingest": ingest or None,
        "distributed": None if dist is None else {"world": dist.world, "backend": dist.backend, "sync_bn": sync_bn},
        "float64": float64,
        "perturbation_npy": npy_file,
        "outputs": {**out["outputs"], **({"profile_trace.json": {
            "written": True, "why": "--profile: a torch.profiler trace of the first round"}} if profile else {})},
        "files": [{"index": i, "source": p, "output": w, "label": int(y), "linf_255": int(l)}
                  for i, (p, w, y, l) in enumerate(zip(data.paths, written, data.labels.tolist(), linf.tolist()))],
        "history": result.history,
        "resumed_from_epoch": result.resumed_from,
        "timings_s": timings,
        "writing_s": out["seconds"],
        "generation_s": gen_s,
        "rounds": rounds,
        "images_per_s": len(data) * rounds / gen_s if gen_s > 0 else None,
        "total_s": time.perf_counter() - t_start,
    }
    return manifest


def _unchanged_message(unchanged: int, n: int, mean_abs_255: float, method: str, cfg, rounding: str) -> str:
    """Why images may have come out unchanged, with the numbers of this run."""
    head = (f"all {n} protected images are identical to their inputs" if unchanged == n
            else f"{unchanged} of {n} protected images are identical to their inputs")
    cause = f"mean |delta| before rounding is {mean_abs_255:.3g}/255"
    if issubclass(METHODS[method], SurrogateMethod) and not METHODS[method].classwise:  # class-wise: a step per batch
        most = sum(cfg.step_size(e) for e in range(1, cfg.epochs + 1)) * cfg.pgd_steps * 255
        cause += (f"; {cfg.epochs} rounds x {cfg.pgd_steps} steps move a pixel by at most {most:.3g}/255 in all: "
                  "the schedule is likely too short for its step size (raise epochs, pgd_steps or the step size)")
    if rounding == "nearest":
        cause += "; rounding='nearest' also drops any perturbation under half a grey level"
    return f"{head} ({cause})"
