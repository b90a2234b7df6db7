"""Export a protected folder in APBench's layout, so its ``train.py`` can evaluate our poisons.

APBench (the common benchmark of availability poisons) reads a poisoned CIFAR
training set as 8-bit PNGs named by data-set index,

    ROOT/<method>_poisons/<dataset>/data/<index>.png

and takes the labels from the clean data set at the same index. Our index is the
order of ``manifest.json``'s ``files`` (class folders sorted, files sorted within
each), unless ``order`` gives the data set's own order as one source path per
line (e.g. the order of torchvision's CIFAR-10 arrays). ``index.json`` beside the
images records, per index, the source path and the label, so the order can be
checked before training.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .exports import read_json, write_json_atomic


def export_apbench(protected_dir, root, *, method: str | None = None, dataset: str = "c10", order=None,
                   overwrite: bool = False) -> Path:
    """Copy the PNGs of ``protected_dir`` (an output of ``protect``) into APBench's layout under ``root``.

    method: the folder's method name (default: the manifest's); dataset: APBench's data-set
    key ("c10", "c100", "svhn", ...); order: a text file (or list) of source paths, one per
    index. Returns the ``data`` folder written. Refuses a non-empty target unless ``overwrite``.
    """
    protected_dir = Path(protected_dir)
    manifest_path = protected_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{protected_dir} has no manifest.json: export a folder written by `ue-fast protect`")
    manifest = read_json(manifest_path)
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise ValueError(f"{manifest_path} lists no files")
    method = method or manifest.get("method")
    if not method or not isinstance(method, str) or "/" in method:
        raise ValueError(f"invalid method name {method!r}")
    if not isinstance(dataset, str) or not dataset or "/" in dataset:
        raise ValueError(f"invalid dataset key {dataset!r}")
    by_source = {f["source"]: f for f in files}
    if order is not None:
        paths = order if isinstance(order, (list, tuple)) else \
            [line.strip() for line in Path(order).read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [p for p in paths if p not in by_source]
        if missing:
            raise ValueError(f"{len(missing)} paths of the order are not in the manifest (e.g. {missing[0]!r})")
        if len(set(paths)) != len(paths) or len(paths) != len(files):
            raise ValueError(f"the order must list each of the {len(files)} source paths exactly once, "
                             f"got {len(paths)} lines ({len(set(paths))} distinct)")
        files = [by_source[p] for p in paths]
    target = Path(root) / f"{method}_poisons" / dataset / "data"
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise ValueError(f"{target} is not empty: pass overwrite=True (--overwrite) to replace it")
        # Replace only an earlier export: numbered PNGs and nothing else.
        foreign = sorted(p.name for p in target.iterdir()
                         if not (p.is_file() and p.suffix == ".png" and p.stem.isdigit()))
        if foreign:
            raise ValueError(f"refusing to replace {target}: it holds more than an earlier export's "
                             f"<index>.png files ({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''})")
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        src = protected_dir / f["output"]
        if not src.is_file():
            raise ValueError(f"{src} is listed in the manifest but missing")
        shutil.copyfile(src, target / f"{i}.png")  # protect() writes 8-bit PNGs already
    write_json_atomic(target.parent / "index.json",
                      [{"index": i, "source": f["source"], "label": f["label"]} for i, f in enumerate(files)])
    return target
