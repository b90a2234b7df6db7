"""Export a protected folder in APBench's layout, so its ``train.py`` can evaluate our poisons.

APBench (lafeat/apbench, the common benchmark of availability poisons) reads poisons from
``dataset/<type>_poisons/`` under the folder it runs in (``util.py``, ``get_dataset``):

- CIFAR-10, CIFAR-100, SVHN (keys ``c10``, ``c100``, ``svhn``): 8-bit RGB PNGs named by
  data-set index, ``<type>_poisons/<key>/data/<index>.png``; its ``Dataset_load`` lists that
  folder, takes the index from each file name and the label from the clean torchvision set
  at that index, and has as many items as the clean set: a missing index fails there, and
  the folder must hold nothing but ``<index>.png`` files.
- ImageNet-100 (``imagenet100``): an ImageFolder, ``<type>_poisons/imagenet100/<class>/<j>.png``,
  labels from the class folders.

``<type>`` must be one of the names its ``get_dataset`` accepts (:data:`APBENCH_TYPES`;
anything else stops it with ``ValueError: Valid type poisons``), so a poison of ours is
exported under one of those names (``--type``).

The index is the data set's order recorded in the manifest: a CIFAR/SVHN distribution's
own order, or a folder's order file. A folder protected in its sorted order has no known
relation to the indices APBench uses, so exporting it needs ``order`` (the source paths in
the data set's order) or ``allow_folder_order=True``. ``index.json`` (beside ``data/``, or in
the ``imagenet100`` folder, where ImageFolder ignores files) records per index the source
path and the label, so the order can be checked before training.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from ..outputs import check_output_folder, remove_owned
from .exports import read_json, write_json_atomic
from .scan import read_order

# util.py, get_dataset: the poison types train.py accepts, and the data-set keys.
APBENCH_TYPES = ("dc", "em", "rem", "ntga", "hypo", "lsp", "ar", "tap", "ops")
# The training-set sizes APBench's loaders assume (poisons_generate.py's noise buffers).
APBENCH_DATASETS = {"c10": 50000, "c100": 50000, "svhn": 73257, "imagenet100": 20000}
_KEY_OF_FORMAT = {"cifar10": "c10", "cifar100": "c100", "svhn": "svhn"}


class APBenchExportWarning(UserWarning):
    """The export is written but APBench will not read it as it is (a type name it refuses, a base set that
    differs from the export)."""


def export_apbench(protected_dir, root, *, poison_type: str | None = None, dataset: str = "c10", order=None,
                   allow_folder_order: bool = False, overwrite: bool = False, method: str | None = None) -> Path:
    """Copy the PNGs of ``protected_dir`` (an output of ``protect``) into APBench's layout under ``root``.

    poison_type: the ``<type>`` of the folder name (default: the manifest's method; ``method``
        is an older name of this argument); warns (:class:`APBenchExportWarning`) when APBench
        does not accept it.
    dataset: APBench's data-set key, one of :data:`APBENCH_DATASETS`; warns when APBench will
        not pair the export with the base set it reads (:func:`_base_mismatch`: a folder export
        whose count is not the standard distribution's, a distribution's test split, part of
        a distribution or another order). An export of a whole CIFAR/SVHN distribution in its
        index order, of any size, matches APBench run on that same distribution.
    order: a text file (or list) of source paths, one per index: the data set's order, when
        the manifest does not record it (a folder protected without ``--order``), or to
        reorder. allow_folder_order: export a folder's sorted order as the index order.

    Returns the folder written (``.../data`` for CIFAR and SVHN, ``.../imagenet100``).
    Refuses a non-empty target unless ``overwrite`` (and then only an earlier export).
    """
    protected_dir = Path(protected_dir)
    # never inside the protected folder: protecting or evaluating it again would read the export as a class
    check_output_folder(Path(root), {"protected folder": protected_dir}, "the APBench root")
    manifest_path = protected_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{protected_dir} has no manifest.json: export a folder written by `ue-fast protect`")
    manifest = read_json(manifest_path)
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise ValueError(f"{manifest_path} lists no files")
    if poison_type is not None and method is not None and poison_type != method:
        raise ValueError(f"poison_type {poison_type!r} and method {method!r} disagree: give one")
    poison_type = poison_type or method or manifest.get("method")
    if not poison_type or not isinstance(poison_type, str) or "/" in poison_type or poison_type.startswith("."):
        raise ValueError(f"invalid poison type name {poison_type!r}")
    if dataset not in APBENCH_DATASETS:
        raise ValueError(f"unknown APBench data-set key {dataset!r}: APBench reads {', '.join(APBENCH_DATASETS)}")
    origin = manifest.get("dataset") or {"format": "image-folder", "order": "sorted"}
    expected_key = _KEY_OF_FORMAT.get(origin.get("format"))
    if expected_key is not None and expected_key != dataset:
        raise ValueError(f"{protected_dir} protects a {origin['format']} data set; its APBench key is "
                         f"{expected_key!r}, not {dataset!r}")
    if order is not None:
        files = _reorder(files, read_order(order))
    elif origin.get("order") == "sorted" and not allow_folder_order:
        raise ValueError(
            f"{protected_dir} was protected from an image folder in its sorted order, which says nothing of the "
            f"indices APBench gives its clean {dataset} images: pass order=FILE (--order FILE, the source paths "
            "in the data set's order), protect with --order or from the data set's own files "
            "(cifar-10-batches-py/, ...), or allow_folder_order=True (--allow-folder-order) if the sorted "
            "order is the data set's order")

    if poison_type not in APBENCH_TYPES:
        warnings.warn(f"APBench's train.py accepts only the poison types {', '.join(APBENCH_TYPES)} and stops with "
                      f"'ValueError: Valid type poisons' on {poison_type!r}: export under one of them (--type NAME) "
                      "to train on it there", APBenchExportWarning, stacklevel=2)
    mismatch = _base_mismatch(manifest, origin, files, dataset, expected_key)
    if mismatch:
        warnings.warn(mismatch, APBenchExportWarning, stacklevel=2)

    base = Path(root) / f"{poison_type}_poisons" / dataset
    folder, dest = apbench_layout(dataset, manifest.get("classes") or [], [f["label"] for f in files])
    target, index_path = base / folder if folder else base, base / "index.json"
    _clear(target, index_path, overwrite)
    for d in sorted({Path(p).parent for p in dest}):
        (target / d).mkdir(parents=True, exist_ok=True)
    for f, rel in zip(files, dest):
        src = protected_dir / f["output"]
        if not src.is_file():
            raise ValueError(f"{src} is listed in the manifest but missing")
        shutil.copyfile(src, target / rel)  # protect() writes 8-bit PNGs (RGBA where the input had alpha)
    write_json_atomic(index_path, apbench_index([f["source"] for f in files], [f["label"] for f in files], dest))
    return target


def apbench_layout(dataset: str, classes: list[str], labels: list[int]) -> tuple[str, list[str]]:
    """Where APBench reads the images of ``dataset``'s poisons, relative to
    ``<type>_poisons/<dataset>/``: (the folder, "" for the dataset's own folder; each image's path
    in it, image i being the data set's index i)."""
    if dataset != "imagenet100":
        return "data", [f"{i}.png" for i in range(len(labels))]
    # ImageFolder sorts class folders as strings: the class names, sorted, give label i to
    # folder i as APBench's clean sets (ImageFolders of the same names) do; bare numbers
    # ("0".."99", as APBench's own export writes them) would sort "10" before "2".
    names = classes if classes == sorted(classes) and classes else \
        [f"{i:0{len(str(len(classes) - 1))}d}" for i in range(len(classes))]
    return "", [f"{names[y]}/{i}.png" for i, y in enumerate(labels)]


def apbench_index(sources: list[str], labels: list[int], dest: list[str]) -> list[dict]:
    """``index.json``: per index, its source path, label and file."""
    return [{"index": i, "source": s, "label": y, "file": rel}
            for i, (s, y, rel) in enumerate(zip(sources, labels, dest))]


_TORCHVISION = {"c10": "CIFAR10(train=True)", "c100": "CIFAR100(train=True)", "svhn": "SVHN(split='train')"}


def _base_mismatch(manifest: dict, origin: dict, files: list[dict], dataset: str, expected_key) -> str | None:
    """Why APBench will not pair this export with its own clean base set, or None when it will.

    APBench's base set for ``c10``/``c100``/``svhn`` is torchvision's training set read from the
    data folder it is given; ``Dataset_load`` has one item per base image, takes the i-th file of
    the poison folder's listing for item i and labels file ``<index>.png`` with base image
    ``<index>``. A protected CIFAR/SVHN distribution (the manifest's ``dataset``: its format, the
    train split, read in index order) exported whole and in that order is that base set,
    whatever its size, when APBench reads the same distribution (a 500-image CIFAR-10
    distribution gives 500 items and 500 files): no warning. Anything else (an image folder, an
    arrays file) can only match the standard distribution, ``APBENCH_DATASETS`` images: another
    count fails. ``imagenet100`` is an ImageFolder: it trains on whatever it holds, so another
    count is another training set, not an error.
    """
    n, need = len(files), APBENCH_DATASETS[dataset]
    if dataset == "imagenet100":
        if n == need:
            return None
        return (f"the export holds {n} images but APBench's imagenet100 training set has {need}: its ImageNet-100 "
                "runs (imagenet_train.py) train on whatever the folder holds, beside a clean validation set of its "
                f"own, so they train on these {n} images, not on APBench's training set")
    if expected_key is not None and origin.get("order") == "index":  # a CIFAR/SVHN distribution of ours
        split = origin.get("split")
        if split is None:  # a single .mat file is its own split: its name says which
            names = " ".join(Path(f).name for f in origin.get("files") or [])
            split = next((k for k in ("test", "extra") if f"{k}_32x32" in names), "train")
        if split != "train":
            return (f"{manifest.get('num_images', n)} images of the {split} split of a {origin.get('format')} "
                    f"distribution: APBench's {dataset} base set is the training split (torchvision's "
                    f"{_TORCHVISION[dataset]}), where index i is another image with another label")
        total = manifest.get("num_images")
        if isinstance(total, int) and total != n:
            return (f"the export holds {n} of the {total} images of the {origin.get('format')} distribution: "
                    f"APBench's Dataset_load has one item per image of it and fails (IndexError) at item {n}")
        if any(f.get("index") != i for i, f in enumerate(files)):
            return (f"the export's order is not the {origin.get('format')} distribution's index order: APBench "
                    "labels file <index>.png with the distribution's image <index>, which is another image here")
        return None
    if n == need:
        return None
    what = ("an image folder" if origin.get("format") == "image-folder"
            else f"{origin.get('format', 'unknown')} data, not a distribution APBench reads")
    if n < need:
        return (f"the export holds {n} images but APBench's {dataset} training set has {need}: the base set it reads "
                f"is torchvision's {_TORCHVISION[dataset]} from its data folder, and this export comes from {what}, "
                f"which matches only the standard distribution of {need} images; Dataset_load has one item per base "
                f"image and takes the i-th file of the folder's listing for item i, so it fails (IndexError) at item "
                f"{n}. Protect the data set's own files (cifar-10-batches-py/, ...) of these images to export a "
                "distribution APBench can read whole")
    return (f"the export holds {n} images but APBench's {dataset} training set has {need}: Dataset_load reads "
            f"{need} files of the folder's listing and labels file <index>.png with base image <index>, which the "
            f"files numbered {need} and above do not have (IndexError)")


def _reorder(files: list[dict], paths: list[str]) -> list[dict]:
    by_source = {f["source"]: f for f in files}
    missing = [p for p in paths if p not in by_source]
    if missing:
        raise ValueError(f"{len(missing)} paths of the order are not in the manifest (e.g. {missing[0]!r})")
    if len(set(paths)) != len(paths) or len(paths) != len(files):
        raise ValueError(f"the order must list each of the {len(files)} source paths exactly once, "
                         f"got {len(paths)} lines ({len(set(paths))} distinct)")
    return [by_source[p] for p in paths]


def _clear(target: Path, index_path: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``target`` unless ``overwrite``; then remove exactly what the earlier
    export wrote there, as its ``index.json`` lists it, refusing (and naming them) if the folder
    holds anything else, or no readable index to tell what is ours."""
    if not (target.exists() and any(target.iterdir())):
        return
    if not overwrite:
        raise ValueError(f"{target} is not empty: pass overwrite=True (--overwrite) to replace an earlier export")
    try:
        owned = {e["file"] for e in read_json(index_path)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"refusing to replace {target}: no readable {index_path} of an earlier export says which "
                         f"of its files ue_fast wrote ({type(e).__name__}: {e}); empty it yourself, or choose "
                         "another root") from None
    inside = index_path.parent == target
    remove_owned(target, owned | ({"index.json"} if inside else set()), "an earlier export", owned_dirs=())
    if not inside:
        index_path.unlink(missing_ok=True)
