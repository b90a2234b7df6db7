"""Is a clean set the protected set's clean counterpart? One streamed check of every pair.

``evaluate`` (``clean=``, ``mi``, ``ud``, ``poison_ratio``, ``reference``) and ``report`` compare
a protected set with clean images paired by name (a ``protect`` output against its input) or
by index (another tool's poisons against their base set). Paired wrongly (a clean folder with
the same file names but shuffled images, another data set of the same size, an input folder
changed since ``protect`` ran) every gap would be computed on the wrong pairs. :func:`check_pairs`
compares protected image i with clean image i, by chunks (the sets may be large and memory-mapped;
one pass of integer arithmetic, cheap beside training), against what bounds the protection:

- a ``protect`` output (its ``manifest.json``, found beside the folder or beside protect's own
  ``poison.pt`` / ``perturbation_int8.npy``): every pair's L-inf must be within the budget
  (``budget.eps_255``, or ``settings.eps_255`` in older manifests; ``floor(eps + 1e-6)`` grey
  levels, protect's own rule) and equal to the ``linf_255`` the manifest recorded for that file.
  For a method that is not an L_p perturbation (``cuda``: a per-class convolution, whose
  ``budget`` bounds no pixel difference) only the per-file records are compared. A sample-wise
  tensor of protect's holds the exact differences, so base + perturbation must clip no pixel.
- another tool's perturbation tensor (no manifest): |protected - base| is bounded by the
  tensor's own values whatever the base set, so L-inf proves nothing. What does is clipping
  (``ue_fast.data.poisons``): a perturbation made against this base set and clamped to its pixel
  range clips no pixel, where an unrelated base set clips some. Zero clipped pixels where a
  shifted pairing clips some confirms the base set; otherwise the pairs are not checked (a
  generator that does not clamp, or a class-wise perturbation, clips on its own base set too),
  and the record says so.
- protected images with no known budget (an APBench folder, a uint8 image tensor, a folder
  without a manifest, or images resized after protection, to which the manifest's records no
  longer apply): a budget-free test. Each protected image must be closer (mean absolute
  difference) to its own clean counterpart than to the next clean image of the set: a
  protection changes an image far less than two images of a data set differ. Refused when more
  than ``UNMATCHED_LIMIT`` (a quarter) of the pairs fail it (wrong pairs fail about half the
  time); fewer failures are named in a :class:`PairsWarning` (near-duplicate neighbours fail it
  too).

A mismatch is refused with :class:`PairMismatchError` (a ``ValueError``) naming up to five
files and their L-inf. The record (:func:`check_pairs`'s return, ``pairs_checked`` in the
results) says what was checked and, in ``not_checked``, what was not.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import ImageSet, read_json

CHUNK_ELEMS = 1 << 23  # image elements per chunk (int16 temporaries of a few tens of MB)
UNMATCHED_LIMIT = 0.25  # budget-free test: refuse when more than this share of pairs is not closest to its own
EXAMPLES = 5  # files named in an error
# What protect writes beside manifest.json that evaluate reads as a poison tensor; the
# sample-wise ones hold protected - clean exactly.
OURS_EXACT = ("poison.pt", "perturbation_int8.npy", "perturbation_int16.npy")
OURS_TENSORS = OURS_EXACT + ("poison_classwise.pt",)


class PairMismatchError(ValueError):
    """The clean set is not the protected set's clean counterpart."""


class PairsWarning(UserWarning):
    """Some pairs look unrelated, too few to refuse the set: named for inspection."""


@dataclass
class Budget:
    """What bounds |protected - clean| pair by pair, and where that comes from."""

    rule: str  # "manifest", "perturbation" (another tool's tensor), "nearest" (budget-free test)
    source: str  # where the budget comes from, in words
    budget: dict | None = None  # as recorded: {"kind": "linf", "eps_255": 8.0, ...}, or None
    bound_255: int | None = None  # the L-inf bound checked, in grey levels
    records: torch.Tensor | None = None  # int64 [N]: the manifest's linf_255 per protected image, -1 if none
    exact_fit: bool = False  # a sample-wise tensor of protect's: no pixel may be clipped
    notes: list[str] = field(default_factory=list)  # what is not checked


def _manifest_near(protected: ImageSet, path) -> tuple[Path, dict] | tuple[None, None]:
    origin = protected.origin or {}
    p = Path(path) if path is not None else (Path(origin["path"]) if origin.get("path") else None)
    if p is None:
        return None, None
    if p.is_dir():
        m = p / "manifest.json"
    elif p.name in OURS_TENSORS:
        m = p.parent / "manifest.json"
    else:
        return None, None
    if not m.is_file():
        return None, None
    doc = read_json(m)  # a damaged manifest is an error naming it, never a set without a budget
    return (m, doc) if isinstance(doc, dict) and isinstance(doc.get("files"), list) else (None, None)


def budget_of(protected: ImageSet, path=None) -> Budget:
    """The :class:`Budget` of ``protected``: from the ``protect`` manifest at ``path`` (a protected
    folder, or protect's poison tensor in one) or at ``protected.origin["path"]``; else from what
    ``load_poisoned`` recorded in ``origin``; else the budget-free test."""
    origin = protected.origin or {}
    n = len(protected)
    mpath, doc = _manifest_near(protected, path)
    tensor = origin.get("format") == "tensor"
    layout = origin.get("layout")
    if doc is not None:
        budget = doc.get("budget") or {"kind": "linf", "eps_255": (doc.get("settings") or {}).get("eps_255")}
        shape = doc.get("image_size")
        if shape is not None and list(shape) != list(protected.image_size):
            return Budget("nearest", f"none: the images are {protected.image_size[0]}x{protected.image_size[1]}, "
                          f"resized from the {shape[0]}x{shape[1]} that {mpath} describes",
                          budget, notes=["the manifest's budget and per-file L-inf records apply to the images as "
                                         "protect wrote them, not resized: checked only that each protected image is "
                                         "closest to its own clean counterpart"])
        files = doc["files"]
        records = torch.full((n,), -1, dtype=torch.int64)
        if tensor:  # protect's tensors: row i is file index i
            if len(files) == n and all(f.get("index") == i for i, f in enumerate(files)):
                records = torch.tensor([int(f.get("linf_255", -1)) for f in files], dtype=torch.int64)
        else:
            by_output = {f.get("output"): f.get("linf_255") for f in files if f.get("linf_255") is not None}
            records = torch.tensor([int(by_output.get(p, -1)) for p in protected.paths], dtype=torch.int64)
        b = Budget("manifest", str(mpath), budget, records=records,
                   exact_fit=tensor and layout == "sample-wise" and Path(origin.get("path", "")).name in OURS_EXACT)
        missing = int((records < 0).sum())
        if missing:
            b.notes.append(f"{missing} of {n} protected images have no linf_255 record in the manifest: those are "
                           "checked against the budget only")
        eps = budget.get("eps_255")
        if budget.get("kind") == "linf" and isinstance(eps, (int, float)):
            if budget.get("holds") is False:
                b.notes.append(f"the manifest says its budget eps {eps:g}/255 does not hold (max "
                               f"{doc.get('linf_max_255')}/255): pairs checked against the per-file records only")
            else:
                b.bound_255 = math.floor(eps + 1e-6)
        elif budget.get("kind") != "linf":
            b.notes.append(f"the budget ({budget.get('kind')}: {budget.get('what', 'not an L-inf bound')}) bounds "
                           "no pixel difference: no L-inf bound checked, only each pair's L-inf against the "
                           "manifest's record for its file (a wrong pair whose L-inf happens to equal it passes)")
        if tensor and layout == "class-wise":
            b.notes.append("a class-wise perturbation puts any base set with these labels within the budget: only "
                           "the per-file L-inf records tell base sets apart, weakly")
        return b
    if tensor and layout in ("sample-wise", "class-wise"):
        return Budget("perturbation", f"the perturbation tensor {origin.get('path')} (another tool's; no manifest)")
    what = {"apbench": "an APBench poison folder", "tensor": "a tensor of protected images"}.get(
        origin.get("format"), "a set without a protect manifest")
    return Budget("nearest", f"none: {what} records no budget")


def check_pairs(protected: ImageSet, clean: ImageSet, *, path=None, what: str = "--clean",
                budget: Budget | None = None) -> dict:
    """Check every pair (protected image i, clean image i) against the protection's budget.

    path: where ``protected`` was read from (a protect folder or a poison tensor; default
    ``protected.origin["path"]``). what: how messages name the clean set. budget: default
    :func:`budget_of`. Raises :class:`PairMismatchError` on a mismatch (see the module
    docstring); returns the record: ``count``, ``max_linf_255``, ``budget``, ``bound_255``,
    ``source``, ``rule``, ``checked`` (what was verified, in words), ``not_checked`` (None or
    what could not be), and per rule ``unmatched`` or ``clipped_pixels``.
    """
    n = len(protected)
    if len(clean) != n or tuple(clean.images.shape[1:]) != tuple(protected.images.shape[1:]):
        raise PairMismatchError(f"{what} holds {len(clean)} images of {tuple(clean.images.shape[1:])}, the protected "
                                f"set {n} of {tuple(protected.images.shape[1:])}: they cannot be pairs")
    b = budget or budget_of(protected, path)
    nearest = b.rule == "nearest" and n > 1
    linf, own, other = _distances(protected, clean, nearest)
    record = {"count": n, "max_linf_255": int(linf.max()) if n else 0, "budget": b.budget, "bound_255": b.bound_255,
              "source": b.source, "rule": b.rule, "checked": [], "not_checked": None}
    notes = list(b.notes)
    problems = []  # sentences naming the mismatched pairs

    def name(i: int) -> str:
        return protected.paths[i] if i < len(protected.paths) else str(i)

    _check_bound(b, linf, record, problems, name)
    _check_clipping(b, protected.origin or {}, record, notes, problems)
    if nearest:
        elems = max(1, math.prod(protected.images.shape[1:]))
        _check_nearest(linf, own, other, elems, record, notes, problems, name, what)
    elif b.rule == "nearest":
        notes.append("a single image: no budget known and nothing to compare it with: not checked")
    record["not_checked"] = "; ".join(notes) or None
    if problems:
        raise PairMismatchError("; ".join(problems) + f": {what} is not the protected set's clean counterpart "
                                "(shuffled or another set?)")
    return record


def _examples(idx: torch.Tensor, fmt) -> str:
    return ", ".join(fmt(i) for i in idx[:EXAMPLES].tolist()) + (", ..." if len(idx) > EXAMPLES else "")


def _distances(protected: ImageSet, clean: ImageSet, nearest: bool):
    """Per pair, by chunks: the L-inf distance (int64 [N], in 1/255) and, for the ``nearest`` rule,
    the L1 distance to its own clean image and to the next one (else None, None)."""
    n = len(protected)
    linf = torch.zeros(n, dtype=torch.int64)
    own = torch.zeros(n, dtype=torch.int64) if nearest else None
    other = torch.zeros(n, dtype=torch.int64) if nearest else None
    step = max(1, CHUNK_ELEMS // max(1, math.prod(protected.images.shape[1:])))
    for a in range(0, n, step):
        e = min(n, a + step)
        p = protected.images[a:e].to(torch.int16)
        d = (p - clean.images[a:e].to(torch.int16)).abs_().flatten(1)
        linf[a:e] = d.amax(1)
        if nearest:
            own[a:e] = d.sum(1, dtype=torch.int64)
            nxt = clean.images[(torch.arange(a, e) + 1) % n].to(torch.int16)
            other[a:e] = (p - nxt).abs_().flatten(1).sum(1, dtype=torch.int64)
    return linf, own, other


def _check_bound(b: Budget, linf: torch.Tensor, record: dict, problems: list, name) -> None:
    """Every pair within the budget's L-inf bound, and equal to the L-inf the manifest recorded for
    its file (when it did)."""
    n = len(linf)
    over_mask = torch.zeros(n, dtype=torch.bool)
    if b.bound_255 is not None:
        over_mask = linf > b.bound_255
        over = torch.nonzero(over_mask)[:, 0]
        record["checked"].append(f"every pair's L-inf <= {b.bound_255}/255 (the budget eps "
                                 f"{b.budget.get('eps_255'):g}/255)")
        if len(over):
            problems.append(f"{len(over)} of {n} pairs differ by more than eps {b.bound_255}/255: "
                            + _examples(over, lambda i: f"{name(i)} {int(linf[i])}/255"))
    if b.records is not None and bool((b.records >= 0).any()):
        has = b.records >= 0
        off = torch.nonzero(has & (linf != b.records) & ~over_mask)[:, 0]  # those over the budget are named above
        record["checked"].append(f"every pair's L-inf equals the linf_255 the manifest recorded for its file "
                                 f"({int(has.sum())} files)")
        if len(off):
            problems.append(f"{len(off)} {'more ' if problems else ''}of {n} pairs differ from the L-inf protect "
                            "recorded for their file: "
                            + _examples(off, lambda i: f"{name(i)} {int(linf[i])}/255 (recorded "
                                                        f"{int(b.records[i])}/255)"))


def _check_clipping(b: Budget, origin: dict, record: dict, notes: list, problems: list) -> None:
    """A perturbation tensor against its base set: base + perturbation must clip no pixel where the
    tensor holds protected - clean exactly; another tool's tensor is consistent or not checked."""
    if b.rule not in ("manifest", "perturbation") or "clipped_pixels" not in origin:
        return
    clipped, shifted = origin["clipped_pixels"], origin.get("clipped_pixels_shifted")
    record.update(clipped_pixels=clipped, clipped_pixels_shifted=shifted)
    if b.exact_fit:
        record["checked"].append("base + perturbation clips no pixel (protect's sample-wise tensor holds "
                                 "protected - clean exactly)")
        if clipped:
            hit = origin.get("clipped_images", 0)
            named = ", ".join(origin.get("clipped_examples", [])) + (", ..." if hit > EXAMPLES else "")
            problems.append(f"base + perturbation leaves [0, 255] at {clipped} pixels of {hit} images ({named}), "
                            "where the images it was made from fit exactly")
    elif b.rule == "perturbation":
        if clipped == 0 and shifted:
            record["checked"].append(f"base + perturbation clips no pixel, where a shifted pairing clips "
                                     f"{shifted}: the perturbation fits this base set's pixel range as one made "
                                     "against it and clamped does")
        else:
            notes.append(f"another tool's {origin.get('layout')} perturbation: |protected - base| is bounded by "
                         f"the tensor's own values whatever the base set; base + perturbation clips {clipped} "
                         f"pixels here, {shifted} on a shifted pairing: consistent with this base set and a "
                         "generator that does not clamp, and with another base set alike: the pairs are not "
                         "checked")


def _check_nearest(linf, own, other, elems: int, record: dict, notes: list, problems: list, name, what: str) -> None:
    """No budget known: each protected image must be closer to its own clean image than to the next."""
    n = len(linf)
    bad = torch.nonzero(own >= other)[:, 0]
    record["unmatched"] = len(bad)
    record["checked"].append(f"each protected image is closer (mean |difference|) to its own clean counterpart "
                             f"than to the next clean image: {n - len(bad)} of {n} pairs")
    notes.append("no budget known: no L-inf bound checked")
    if len(bad) > UNMATCHED_LIMIT * n:
        problems.append(f"{len(bad)} of {n} protected images are no closer to their clean counterpart than to "
                        "another clean image (a protection changes an image far less than two images differ): "
                        + _examples(bad, lambda i: f"{name(i)} L-inf {int(linf[i])}/255, mean |difference| "
                                                   f"{own[i] / elems:.1f}/255 vs {other[i] / elems:.1f}/255 to "
                                                   "the next"))
    elif len(bad):
        warnings.warn(f"{len(bad)} of {n} protected images are no closer to their clean counterpart in {what} "
                      f"than to the next clean image (near-duplicates, or wrong pairs): "
                      + _examples(bad, lambda i: f"{name(i)} L-inf {int(linf[i])}/255"), PairsWarning, stacklevel=4)


def describe(record: dict | None) -> str:
    """One line on a ``pairs_checked`` record, for printing."""
    if not record:
        return "clean counterparts: none compared"
    head = (f"pairs checked: {record['count']} protected/clean pairs, max |protected - clean| "
            f"{record['max_linf_255']}/255")
    if record.get("bound_255") is not None:
        head += f" (budget {record['bound_255']}/255, from {record['source']})"
    else:
        head += f" (budget: {record['source']})"
    text = head + (": " + "; ".join(record["checked"]) if record["checked"] else ": nothing verified")
    if record.get("not_checked"):
        text += f". Not checked: {record['not_checked']}"
    return text
