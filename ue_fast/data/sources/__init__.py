"""Sources: what a user points ``protect``, ``evaluate`` and ``report`` at, turned into the
data set (images, labels, classes, paths) in the data set's own order.

=============  ================================================================
arrays         ``(images, labels[, classes])`` given in Python (``arrays.py``)
distribution   CIFAR-10/100, SVHN, ``.npz``/``x.npy``+``y.npy`` as their authors ship them
               (``distribution.py``)
webdataset     WebDataset tar shards: a brace pattern, a glob, a list file or one .tar
               (``webdataset.py``; brace patterns need ``ue-fast[webdataset]``)
parquet        Parquet files or a ``datasets.save_to_disk`` folder, image and label columns
               (``parquet.py``; needs ``ue-fast[parquet]``)
lmdb           an LMDB environment of encoded images and labels, read-only (``lmdb.py``;
               needs ``ue-fast[lmdb]``)
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
from .lmdb import LMDB
from .parquet import Parquet
from .webdataset import WebDataset

SOURCES = {cls.name: cls() for cls in (Arrays, Distribution, WebDataset, Parquet, LMDB, ImageFolder)}  # asked in this order
STREAMED = ("webdataset", "parquet", "lmdb")  # read by record, not by file: evaluate reads them through read_dataset


def find_source(source, *, image_key: str | None = None, label_key: str | None = None) -> Source:
    """The source that reads ``source`` (a path, or arrays). ``image_key`` and ``label_key``
    (which member or column holds the image and the label) apply to the sources with keys
    (WebDataset, Parquet) and are refused for the others."""
    for s in SOURCES.values():
        if s.matches(source):
            if getattr(s, "keyed", False):
                return s.with_keys(image_key, label_key)
            if image_key is not None or label_key is not None:
                raise ValueError(f"image_key and label_key (--image-key, --label-key) apply to WebDataset shards "
                                 "and Parquet tables; "
                                 f"{source if s.name != 'arrays' else 'arrays'} is read as {s.name}")
            return s
    raise ValueError(f"cannot read {source!r}: expected a folder, a data set path or a tuple (images, labels)")


__all__ = ["SOURCES", "STREAMED", "Source", "find_source"]
