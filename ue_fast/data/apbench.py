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

from .exports import read_json, write_json_atomic
from .scan import read_order

# util.py, get_dataset: the poison types train.py accepts, and the data-set keys.
APBENCH_TYPES = ("dc", "em", "rem", "ntga", "hypo", "lsp", "ar", "tap", "ops")
# The training-set sizes APBench's loaders assume (poisons_generate.py's noise buffers).
APBENCH_DATASETS = {"c10": 50000, "c100": 50000, "svhn": 73257, "imagenet100": 20000}
_KEY_OF_FORMAT = {"cifar10": "c10", "cifar100": "c100", "svhn": "svhn"}


class APBenchExportWarning(UserWarning):
    """The export is written but APBench will not read it as it is (a type name it refuses, too few images)."""


def export_apbench(protected_dir, root, *, poison_type: str | None = None, dataset: str = "c10", order=None,
                   allow_folder_order: bool = False, overwrite: bool = False, method: str | None = None) -> Path:
    """Copy the PNGs of ``protected_dir`` (an output of ``protect``) into APBench's layout under ``root``.

    poison_type: the ``<type>`` of the folder name (default: the manifest's method; ``method``
        is an older name of this argument); warns (:class:`APBenchExportWarning`) when APBench
        does not accept it.
    dataset: APBench's data-set key, one of :data:`APBENCH_DATASETS`; warns when the export
        holds fewer images than APBench's training set of that key.
    order: a text file (or list) of source paths, one per index: the data set's order, when
        the manifest does not record it (a folder protected without ``--order``), or to
        reorder. allow_folder_order: export a folder's sorted order as the index order.

    Returns the folder written (``.../data`` for CIFAR and SVHN, ``.../imagenet100``).
    Refuses a non-empty target unless ``overwrite`` (and then only an earlier export).
    """
    protected_dir = Path(protected_dir)
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
    need = APBENCH_DATASETS[dataset]
    if len(files) < need:
        why = ("its ImageNet-100 runs (imagenet_train.py) train on whatever the folder holds, beside a clean "
               "validation set of its own" if dataset == "imagenet100" else
               "its loader has one item per clean image and fails (IndexError) past the last exported index")
        warnings.warn(f"the export holds {len(files)} images but APBench's {dataset} training set has {need}: {why}",
                      APBenchExportWarning, stacklevel=2)

    base = Path(root) / f"{poison_type}_poisons" / dataset
    if dataset == "imagenet100":
        classes = manifest.get("classes") or []
        # ImageFolder sorts class folders as strings: the class names, sorted, give label i to
        # folder i as APBench's clean sets (ImageFolders of the same names) do; bare numbers
        # ("0".."99", as APBench's own export writes them) would sort "10" before "2".
        names = classes if classes == sorted(classes) and classes else \
            [f"{i:0{len(str(len(classes) - 1))}d}" for i in range(len(classes))]
        target, dest = base, [f"{names[f['label']]}/{i}.png" for i, f in enumerate(files)]
        index_path = base / "index.json"
    else:
        target, dest = base / "data", [f"{i}.png" for i in range(len(files))]
        index_path = base / "index.json"
    _clear(target, overwrite, nested=dataset == "imagenet100")
    for d in sorted({Path(p).parent for p in dest}):
        (target / d).mkdir(parents=True, exist_ok=True)
    for f, rel in zip(files, dest):
        src = protected_dir / f["output"]
        if not src.is_file():
            raise ValueError(f"{src} is listed in the manifest but missing")
        shutil.copyfile(src, target / rel)  # protect() writes 8-bit RGB PNGs already
    write_json_atomic(index_path, [{"index": i, "source": f["source"], "label": f["label"], "file": rel}
                                   for i, (f, rel) in enumerate(zip(files, dest))])
    return target


def _reorder(files: list[dict], paths: list[str]) -> list[dict]:
    by_source = {f["source"]: f for f in files}
    missing = [p for p in paths if p not in by_source]
    if missing:
        raise ValueError(f"{len(missing)} paths of the order are not in the manifest (e.g. {missing[0]!r})")
    if len(set(paths)) != len(paths) or len(paths) != len(files):
        raise ValueError(f"the order must list each of the {len(files)} source paths exactly once, "
                         f"got {len(paths)} lines ({len(set(paths))} distinct)")
    return [by_source[p] for p in paths]


def _clear(target: Path, overwrite: bool, nested: bool) -> None:
    """Refuse a non-empty ``target`` unless ``overwrite``; then remove it if it holds only an
    earlier export (numbered PNGs, in class folders when ``nested``, and index.json)."""
    if not (target.exists() and any(target.iterdir())):
        return
    if not overwrite:
        raise ValueError(f"{target} is not empty: pass overwrite=True (--overwrite) to replace it")

    def ours(p: Path, depth: int) -> bool:
        if p.is_file():
            return (p.suffix == ".png" and p.stem.isdigit()) or (depth == 0 and nested and p.name == "index.json")
        return nested and depth == 0 and p.is_dir() and all(ours(q, 1) for q in p.iterdir())

    foreign = sorted(p.name for p in target.iterdir() if not ours(p, 0))
    if foreign:
        raise ValueError(f"refusing to replace {target}: it holds more than an earlier export's "
                         f"<index>.png files ({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''})")
    shutil.rmtree(target)
