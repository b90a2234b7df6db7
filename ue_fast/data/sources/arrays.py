"""Arrays given in Python: ``(images, labels)`` or ``(images, labels, classes)``
(see :func:`ue_fast.data.images_from_arrays`), in their own index order."""
from __future__ import annotations

from ..folders import images_from_arrays
from .base import Source


class Arrays(Source):
    name = "arrays"

    def matches(self, source) -> bool:
        return isinstance(source, (tuple, list))

    def check(self, source, *, order=None, split: str = "train", resize=None) -> None:
        if order is not None:
            raise ValueError("order applies to an image-folder source; arrays are in their own order already")
        if split != "train":
            raise ValueError(f"split {split!r} applies to a CIFAR or SVHN distribution; arrays are read whole")
        if resize is not None:
            raise ValueError("resize applies to image folders; arrays are kept at their size")

    def read(self, source, **_):
        return images_from_arrays(*source)
