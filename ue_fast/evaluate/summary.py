"""What ``evaluate`` prints and how its results file is read back."""
from __future__ import annotations

from pathlib import Path

from ..data.exports import read_json
from .pairs import describe

FORMAT = "ue_fast.evaluate/1"  # the results document's format; plots refuse others


def _pts(v: float) -> str:
    return f"{100 * v:.2f}%"


def summary_lines(results: dict) -> list[str]:
    """The lines ``ue-fast evaluate`` prints for a results document of :func:`evaluate`: what was
    read, the victim's accuracy (marked when it diverged), clean and protected accuracy side by
    side with the gap and its standard error when there is a clean reference, the partial
    protection, UD and feature statistics when measured, and what the pairs check verified."""
    r = results
    s = r["settings"]
    lines = []
    src = r.get("train_source") or {}
    if src.get("format") in ("apbench", "tensor"):
        lines.append(f"read {src['path']} ({src['layout']}) against the clean base set "
                     f"{(src.get('base') or {}).get('path', '?')}: {r['num_train']} images, max |protected - clean| "
                     f"{src['linf_255']}/255")
    div = r.get("diverged")
    lines.append(f"victim {s['arch']} trained {s['epochs']} epochs on {r['num_train']} images of {r['train']} "
                 f"(defense: {s['defense']}); clean test accuracy on {r['num_test']} images: "
                 f"last {_pts(r['last'])}, peak {_pts(r['best'])}"
                 + (f" (epoch {r['peak_epoch']})" if r.get("peak_epoch") else "") + (" [DIVERGED]" if div else ""))
    if div:
        lines.append(f"DIVERGED at epoch {div['epoch']}: {div['reason']}. This accuracy is a broken network's, not a "
                     f"measure of protection: lower the learning rate (lr {s['lr']:g}) and rerun")
    c = r.get("comparison")
    if c:
        gap = ("diverged (" + " and ".join(c["diverged"]) + " victim), no gap" if c["gap"] is None else
               f"{100 * c['gap']:.2f} ± {100 * c['gap_se']:.2f} points")
        lines.append(f"clean reference ({c['reference']}): last {_pts(c['clean']['last'])} vs protected "
                     f"{_pts(c['protected']['last'])}: gap {gap} (SE over {c['n_test']} test images; reference: "
                     f"{c['from']})")
        if c.get("peak_gap") is not None:
            lines.append(f"at each victim's peak epoch (what stopping early would keep): clean "
                         f"{_pts(c['clean']['best'])} vs protected {_pts(c['protected']['best'])} "
                         f"(epoch {c['protected']['peak_epoch']}): gap "
                         f"{100 * c['peak_gap']:.2f} ± {100 * c['peak_gap_se']:.2f} points")
    else:
        lines.append("no clean reference: nothing to set this accuracy against (reference=True, --reference, trains "
                     "a victim of the same recipe on the clean counterparts)")
    lrn = r.get("learner")
    if lrn:
        lines.append(f"learner {lrn['kind']}: pretrained {lrn['pretrain_epochs']} epochs on the training images "
                     f"without their labels, then a linear probe trained {lrn['probe_epochs']} epochs on the "
                     f"{lrn['probe_on']}; the accuracies above are the probe's")
    d = r.get("detect")
    if d:
        p = d["protected"]
        verdict = "detected" if p["detected"] else "not detected"
        line = (f"detection (UDP, a {p['model']} network trained {p['epochs']} epochs on {p['num_train']} of the "
                f"training images): held-out accuracy {_pts(p['score'])} on the {p['num_held_out']} others, {verdict} (bound "
                f"{_pts(p['bound'])})")
        if d.get("clean"):
            line += (f"; on the clean counterparts {_pts(d['clean']['score'])} "
                     f"(difference {100 * d['difference']:.2f} points)")
        lines.append(line)
    part = r.get("poison_ratio")
    if part and part["clean_part"]:
        lines.append(f"partial protection: {part['protected']} of {r['num_train']} images protected "
                     f"({part['ratio']:g}); the victim above trained on them plus the {part['clean']} clean others. "
                     f"Reference, the {part['clean']} clean images alone: best {_pts(part['clean_part']['best'])}, "
                     f"last {_pts(part['clean_part']['last'])}"
                     + (" [DIVERGED]" if part["clean_part"].get("diverged") else ""))
    if "ud" in r:
        u = r["ud"]
        fig = "undefined (no clean layer above the threshold)" if u["ud"] is None else f"{u['ud']:.3f}"
        lines.append(f"unlearnable distance {fig}: {u['learnable_per_epoch']['protected']:.2f} of {u['num_layers']} "
                     f"layers learnable per epoch on the protected data, {u['learnable_per_epoch']['clean']:.2f} on "
                     f"clean (threshold {u['threshold']:.4g}; {u['settings']['samples'] or 'all'} images)"
                     + (" [a victim DIVERGED: this UD measures nothing]"
                        if div or (u.get("clean_run") or {}).get("diverged") else ""))
    if "mi" in r:
        m = r["mi"]
        lines.append("feature statistics (model trained on the clean counterparts"
                     + (", which DIVERGED" if m.get("reference_model_diverged") else "") + "): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
    if r.get("pairs_checked"):
        lines.append(describe(r["pairs_checked"]))
    return lines


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
