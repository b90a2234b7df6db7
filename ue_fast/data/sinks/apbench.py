"""APBench's poison layout out (``--output-format apbench``): ``<method>_poisons/<key>/data/<i>.png``,
image i of a CIFAR-10 (``c10``), CIFAR-100 (``c100``) or SVHN (``svhn``) training set read in its
own index order, and ``<method>_poisons/<key>/index.json`` (per index its source, label and file),
what ``ue-fast export-apbench`` writes from a PNG tree (``ue_fast.data.apbench``), without the
copy. OUTPUT_DIR is then APBench's ``dataset/`` folder. Any other input goes through the PNG tree
and ``export-apbench``, which takes an order file or ImageNet-100's class folders."""
from __future__ import annotations

import warnings
from pathlib import Path

from ..apbench import _KEY_OF_FORMAT, APBENCH_TYPES, APBenchExportWarning, apbench_index, apbench_layout
from ..exports import write_json_atomic
from .base import Sink, SinkContext
from .png_tree import PNGTree


def apbench_key(origin: dict | None) -> str:
    """APBench's data-set key of a data set read from ``origin``, or a ValueError saying why it has none."""
    origin = origin or {}
    key = _KEY_OF_FORMAT.get(origin.get("format"))
    if key is None or origin.get("order") != "index":
        raise ValueError("the apbench output format writes a CIFAR-10, CIFAR-100 or SVHN training set read from its "
                         "own files (cifar-10-batches-py/, ...), in its index order: APBench labels file <i>.png "
                         "with its own image i. Protect other inputs as PNG, then `ue-fast export-apbench` with the "
                         "data set's order (--order)")
    split = origin.get("split")
    if split is None:  # a single .mat file is its own split: its name says which
        names = " ".join(Path(f).name for f in origin.get("files") or [])
        split = next((k for k in ("test", "extra") if f"{k}_32x32" in names), "train")
    if split != "train":
        raise ValueError(f"the apbench output format writes a training set (APBench's {key} base set is the "
                         f"training split), not the {split} split")
    return key


class APBenchPoisons(PNGTree):
    """The PNG tree's writing (its encoder pool, one file per image), at APBench's paths."""

    name = "apbench"

    def _layout(self, ctx: SinkContext) -> tuple[str, list[str], list[str]]:
        """(``<method>_poisons/<key>``, each image's path in OUTPUT_DIR, and in its folder: index.json's)"""
        key = apbench_key(ctx.origin)
        base = f"{ctx.method}_poisons/{key}"
        folder, dest = apbench_layout(key, ctx.classes, ctx.labels.tolist())
        return base, [f"{base}/{folder}/{d}" for d in dest], dest

    def planned(self, ctx: SinkContext) -> list[str]:
        base, files, _ = self._layout(ctx)
        return [*files, f"{base}/index.json"]

    def open(self, ctx: SinkContext) -> None:
        Sink.open(self, ctx)
        self.base, self.written, self.dest = self._layout(ctx)
        if ctx.method not in APBENCH_TYPES:
            warnings.warn(f"APBench's train.py accepts only the poison types {', '.join(APBENCH_TYPES)} and stops "
                          f"with 'ValueError: Valid type poisons' on {ctx.method!r}: rename the folder "
                          f"{ctx.method}_poisons to <type>_poisons with one of them to train on it there",
                          APBenchExportWarning, stacklevel=2)
        self._start()  # the PNG tree's folders (here one) and encoder pool

    def close(self) -> dict:
        self.abort()
        write_json_atomic(self.ctx.output_dir / self.base / "index.json",
                          apbench_index(self.ctx.paths, self.ctx.labels.tolist(), self.dest))
        return {self.name: {"written": True, "why": f"{self.ctx.n} PNGs named by data-set index in {self.base}/data "
                            "(APBench's layout; OUTPUT_DIR is its dataset/ folder), and its index.json"}}
