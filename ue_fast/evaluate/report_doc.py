"""A report's document: its rows (clean and protected cells, gaps, peaks), the robustness
summary, and what it writes (report.md, report.json, heatmap.png)."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..data import write_json_atomic
from .learners import LEARNERS
from .pairs import describe
from .run import gap_se

FORMAT = "ue_fast.report/1"


def _cell_name(kind: str, arch: str, defense: str, ratio: float | None) -> str:
    return f"{kind}_{arch}_{defense}" + ("" if ratio is None else f"_r{ratio:g}")


def _row(results, arch, defense, ratios, ud):
    """One victim x defence: the clean accuracy and, per ratio, protected, gap, its SE and UD.

    A diverged victim (``evaluate``'s ``diverged``) measures nothing: its cells keep the
    accuracy in the JSON but say ``diverged`` (which runs), and a gap involving it is None."""
    clean = results.get(_cell_name("clean", arch, defense, None))
    clean_div = bool(clean and clean.get("diverged"))
    row = {"arch": arch, "defense": defense, "learner": defense if defense in LEARNERS else "supervised",
           "clean": clean and clean["last"], "clean_best": clean and clean["best"], "clean_diverged": clean_div,
           "ratios": {}}
    for r in ratios:
        doc = results.get(_cell_name("protected", arch, defense, r))
        cell = {"protected": None, "gap": None, "gap_se": None, "clean_part": None, "ud": None, "diverged": None,
                "protected_peak": None, "protected_peak_epoch": None, "peak_gap": None, "peak_gap_se": None}
        if doc is not None:
            cell["protected"], cell["protected_best"] = doc["last"], doc["best"]
            cell["protected_peak"] = doc["best"]
            cell["protected_peak_epoch"] = doc["test_acc"].index(doc["best"]) + 1
            part = (doc.get("poison_ratio") or {}).get("clean_part")
            diverged = ["protected"] if doc.get("diverged") else []
            ref = ref_peak = None
            if part:
                cell["clean_part"] = part["last"]
                ref, ref_peak = part["last"], part["best"]
                if part.get("diverged"):
                    diverged.append("clean part")
            elif clean is not None:
                ref, ref_peak = clean["last"], clean["best"]
                if clean_div:
                    diverged.append("clean")
            if ref is not None:
                n = doc.get("num_test") or 0
                cell["gap"] = None if diverged else ref - doc["last"]
                cell["gap_se"] = gap_se(ref, doc["last"], n) if n else None
                cell["peak_gap"] = None if diverged else ref_peak - doc["best"]
                cell["peak_gap_se"] = gap_se(ref_peak, doc["best"], n) if n else None
            cell["diverged"] = diverged or None
            if ud and doc.get("ud"):
                cell["ud"] = doc["ud"]["ud"]
        row["ratios"][f"{r:g}"] = cell
    return row


def robustness(rows, ratio: float = 1.0) -> list[dict]:
    """Per victim: the protection's worst case over the report's defences at ``ratio``, by
    last-epoch and by peak accuracy: the highest protected accuracy (the defence that restores
    the most), the smallest gap, and the defences that achieve them. Diverged cells are left out
    (and counted); a protection is only as strong as its worst case over what was measured."""
    out = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        cells = [(r["defense"], r["ratios"][f"{ratio:g}"]) for r in rows if r["arch"] == arch]
        ok = [(d, c) for d, c in cells if c["protected"] is not None and not c["diverged"]]
        entry = {"arch": arch, "ratio": ratio, "defenses": [d for d, _ in ok],
                 "left_out": sorted(d for d, c in cells if c["diverged"])}
        for key, acc, gap in (("last", "protected", "gap"), ("peak", "protected_peak", "peak_gap")):
            if not ok:
                entry[key] = None
                continue
            worst = max(ok, key=lambda dc: dc[1][acc])
            gaps = [(d, c[gap]) for d, c in ok if c[gap] is not None]
            least = min(gaps, key=lambda dg: dg[1]) if gaps else None
            entry[key] = {"accuracy": worst[1][acc], "defense": worst[0],
                          "gap": least and least[1], "gap_defense": least and least[0]}
            if key == "peak":
                entry[key]["epoch"] = worst[1]["protected_peak_epoch"]
        out.append(entry)
    return out


def _pct(v, diverged=False) -> str:
    return "diverged" if diverged else "-" if v is None else f"{100 * v:.1f}"


def _gap(cell, key: str = "gap") -> str:
    if cell["diverged"]:
        return "diverged"
    if cell.get(key) is None:
        return "-"
    se = cell.get(key + "_se")
    return f"{100 * cell[key]:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def _row_name(key: str) -> str:
    """A row's name in the robustness lines: a contrastive learner's says that its accuracy and
    gap are a linear probe's, against the same probe on the clean images (often a weak baseline)."""
    if key in LEARNERS and key != "supervised":
        return f"{key} (a linear probe's, against the probe on the clean images)"
    return key


def _robustness_lines(summary: dict, n_defenses: int) -> list[str]:
    lines = ["", "## Robustness", "",
             f"The protection's worst case over the {n_defenses} defence(s) of this report, per victim: the highest "
             "protected accuracy any of them restores, and the smallest gap, by last and by peak accuracy. It holds "
             "only against the defences measured here.", ""]
    for ratio, entries in summary.items():
        for e in entries:
            where = e["arch"] + ("" if ratio == "1" else f" at ratio {ratio}")
            if e["last"] is None:
                lines.append(f"- {where}: no defence measured yet" + (
                    f" (diverged: {', '.join(e['left_out'])})" if e["left_out"] else ""))
                continue
            last, peak = e["last"], e["peak"]
            gap = ("" if last["gap"] is None else
                   f"; smallest gap {100 * last['gap']:.1f} points under {_row_name(last['gap_defense'])}")
            pgap = ("" if peak["gap"] is None else
                    f", smallest peak gap {100 * peak['gap']:.1f} under {_row_name(peak['gap_defense'])}")
            lines.append(f"- {where}: worst case {_pct(last['accuracy'])}% under {_row_name(last['defense'])} (last "
                         f"epoch){gap}; at the peak {_pct(peak['accuracy'])}% under {_row_name(peak['defense'])} "
                         f"(epoch {peak['epoch']}){pgap}"
                         + (f"; diverged, left out: {', '.join(e['left_out'])}" if e["left_out"] else ""))
    return lines


def _write_outputs(out: Path, results, archs, defenses, ratios, ud, source, shared, prot, cl, te, label, *,
                   complete: bool, elapsed: float, detection: dict | None = None) -> None:
    rows = [_row(results, a, d, ratios, ud) for a in archs for d in defenses]
    doc = {"format": FORMAT, "ue_fast_version": __version__, "label": label, "complete": complete,
           "inputs": {"protected": source, "num_train": len(prot), "num_clean": len(cl), "num_test": len(te),
                      "classes": prot.classes, "image_size": list(prot.image_size)},
           "settings": {k: v for k, v in shared.items() if k != "format"}, "archs": list(archs),
           "defenses": [d for d in defenses if d not in LEARNERS],
           "learners": [k for k in LEARNERS if any(r["learner"] == k for r in rows)], "poison_ratios": list(ratios),
           "rows": rows,
           "robustness": {f"{r:g}": robustness(rows, r) for r in ratios}, "detection": detection,
           "cells": results, "elapsed_s": elapsed}
    write_json_atomic(out / "report.json", doc)
    lines = [f"# ue_fast report{': ' + label if label else ''}", ""]
    src = source.get("source") or {}
    lines.append(f"Protected set: {src.get('path', '?')} ({source['kind']}, {len(prot)} images); clean counterparts "
                 f"{len(cl)}; clean test set {len(te)} images; {shared['epochs']} epochs, batch {shared['batch_size']}, "
                 f"peak lr {shared['lr'] if shared['lr'] is not None else 'of each recipe'}, seed {shared['seed']}, "
                 f"ue_fast {__version__}." + ("" if complete else " **Incomplete: the report is still running "
                                                                   "or was interrupted; rerun to resume.**"))
    pairs = source.get("pairs_checked")
    if pairs:
        lines += ["", describe(pairs) + "."]
    lines += ["", "Clean test accuracy (%) of each victim at its last epoch. Gap (points): clean minus protected; "
              "at a ratio below 1, the victim trained on the clean part alone minus the mixed victim; ± its "
              "standard error over the test images, sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n). \"diverged\": the "
              "victim's training diverged (non-finite or exploding loss), so its accuracy measures nothing. "
              "Peak: the protected victim's best test accuracy over its epochs (and that epoch), what a trainer "
              "who stops early keeps; peak gap: the reference's peak minus it."
              + (" UD: unlearnable distance (1 for clean data, lower is less learnable)." if ud else ""), ""]
    learner_rows = [k for k in defenses if k in LEARNERS]
    if learner_rows:
        lines += [f"Rows {' and '.join(learner_rows)}: a contrastive learner (APBench's) pretrained on the set "
                        "without its labels, with no other defence, then a linear probe on its frozen features of the "
                        "clean counterparts; its accuracies are the probe's.", ""]
    head = ["victim", "defence", "clean"]
    for r in ratios:
        if r == 1:
            head += ["protected", "gap", "peak (epoch)", "peak gap"]
        else:
            head += [f"mixed {r:g}", f"clean part {r:g}", f"gap {r:g}", f"peak {r:g} (epoch)", f"peak gap {r:g}"]
        if ud:
            head.append("UD" if r == 1 else f"UD {r:g}")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["arch"], row["defense"], _pct(row["clean"], row.get("clean_diverged"))]
        for r in ratios:
            c = row["ratios"][f"{r:g}"]
            div = c["diverged"] or []
            peak = _pct(c.get("protected_peak"), "protected" in div)
            if c.get("protected_peak") is not None and not div:
                peak += f" ({c['protected_peak_epoch']})"
            cells += [_pct(c["protected"], "protected" in div)] + (
                [] if r == 1 else [_pct(c["clean_part"], "clean part" in div)]) + [_gap(c), peak, _gap(c, "peak_gap")]
            if ud:
                cells.append("diverged" if div else "-" if c["ud"] is None else f"{c['ud']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += _robustness_lines(doc["robustness"], len(defenses))
    if detection:
        p, c = detection["protected"], detection["clean"]
        lines += ["", "## Detection", "",
                  f"UDP (Zhu et al. 2024): a {p['model']} network trained {p['epochs']} epochs on {p['num_train']} "
                  f"images of the set, its accuracy on the {p['num_held_out']} held out: protected set "
                  f"{_pct(p['score'])}%, {'detected' if p['detected'] else 'not detected'} (the paper's bound "
                  f"{_pct(p['bound'])}%)" + ("" if c is None else f"; clean counterparts {_pct(c['score'])}%") + "."]
    (out / "report.md.tmp").write_text("\n".join(lines) + "\n")
    (out / "report.md.tmp").replace(out / "report.md")
    _heatmap(out / "heatmap.png", rows, archs, defenses, ratios, label)


def _heatmap(path: Path, rows, archs, defenses, ratios, label: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ratios), figsize=(1.2 + 1.1 * len(archs) * len(ratios) + 1.5 * len(ratios),
                                                      1.2 + 0.45 * len(defenses)), dpi=120, squeeze=False)
    by = {(r["arch"], r["defense"]): r for r in rows}
    for ax, ratio in zip(axes[0], ratios):
        grid = torch.full((len(defenses), len(archs)), float("nan"))
        diverged = set()
        for i, d in enumerate(defenses):
            for j, a in enumerate(archs):
                cell = by[(a, d)]["ratios"][f"{ratio:g}"]
                if cell.get("diverged"):
                    diverged.add((i, j))
                elif cell["gap"] is not None:
                    grid[i, j] = 100 * cell["gap"]
        im = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=-100, vmax=100, aspect="auto")
        for i in range(len(defenses)):
            for j in range(len(archs)):
                v = float(grid[i, j])
                text = "diverged" if (i, j) in diverged else "-" if v != v else f"{v:.1f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7 if (i, j) in diverged else 8)
        ax.set_xticks(range(len(archs)), archs, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(defenses)), defenses if ax is axes[0][0] else [""] * len(defenses), fontsize=8)
        ax.set_title("protected" if ratio == 1 else f"ratio {ratio:g}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy gap (points)", shrink=0.8)
    if label:
        fig.suptitle(label, fontsize=9)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
