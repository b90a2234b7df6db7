"""Reading an evaluation's sets: the training set (a folder, a data set, a streamed source or
another tool's poisons against their clean base set), its clean counterparts in its order, checked
pair by pair against the protection's budget (``pairs.check_pairs``), and the test set."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import ImageSet, read_json
from ..data.canonical import detect, read_dataset
from ..data.poisons import kind_of, load_poisoned
from ..data.sources import STREAMED, find_source
from ..outputs import warn_nested_outputs
from .pairs import check_pairs


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
