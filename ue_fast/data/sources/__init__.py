"""Sources: what a user points ``protect``, ``evaluate`` and ``report`` at, turned into the
data set (images, labels, classes, paths) in the data set's own order.

=============  ================================================================
arrays         ``(images, labels[, classes])`` given in Python (``arrays.py``)
distribution   CIFAR-10/100, SVHN, ``.npz``/``x.npy``+``y.npy`` as their authors ship them
               (``distribution.py``)
image-folder   class sub-folders of images, sorted or in an order file's order
               (``image_folder.py``)
=============  ================================================================

``find_source(source)`` asks each in this order; adding one is a file with a
:class:`Source` and a line in ``SOURCES``.
"""
from __future__ import annotations

from .arrays import Arrays
from .base import Source
from .distribution import Distribution
from .image_folder import ImageFolder

SOURCES = {cls.name: cls() for cls in (Arrays, Distribution, ImageFolder)}  # asked in this order


def find_source(source) -> Source:
    """The source that reads ``source`` (a path, or arrays)."""
    for s in SOURCES.values():
        if s.matches(source):
            return s
    raise ValueError(f"cannot read {source!r}: expected a folder, a data set path or a tuple (images, labels)")


__all__ = ["SOURCES", "Source", "find_source"]
