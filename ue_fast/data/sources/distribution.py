"""The field's data sets in their authors' distribution (``cifar-10-batches-py/``,
``cifar-100-python/``, an SVHN ``.mat`` or folder, a ``.npz`` with x and y; see
:mod:`ue_fast.data.canonical`), read in their own index order, at their own size."""
from __future__ import annotations

from pathlib import Path

from ..canonical import detect, load_dataset
from .base import Source


class Distribution(Source):
    name = "distribution"

    def matches(self, source) -> bool:
        return isinstance(source, (str, Path)) and detect(source) is not None

    def check(self, source, *, order=None, split: str = "train", resize=None) -> None:
        fmt = detect(source)
        if order is not None:
            raise ValueError(f"order applies to an image-folder source; {source} is a {fmt} data set, read in "
                             "its own index order")
        if resize is not None:
            raise ValueError(f"resize applies to image folders; {source} is a {fmt} data set, kept at its size")

    def read(self, source, *, split: str = "train", **_):
        return load_dataset(source, split, detect(source))
