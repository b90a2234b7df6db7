"""A folder of class sub-folders of images (any format Pillow reads), sorted (classes,
then paths) or in the order of an order file; decoded in parallel into the run's work
folder for protect (:func:`ue_fast.data.ingest.ingest_folder`: out of core, reused on
resume), into memory for evaluate (:func:`ue_fast.data.read_image_folder`)."""
from __future__ import annotations

from pathlib import Path

from ...outputs import warn_nested_outputs
from ..folders import read_image_folder
from ..ingest import ingest_folder
from ..scan import ordered_listing
from .base import Source


class ImageFolder(Source):
    name = "image-folder"

    def matches(self, source) -> bool:
        return isinstance(source, (str, Path))  # what is not a distribution (asked first) is read as a folder

    def check(self, source, *, order=None, split: str = "train", resize=None) -> None:
        if split != "train":
            raise ValueError(f"split {split!r} applies to a CIFAR or SVHN distribution; {source} is read whole")

    def check_input(self, source, *, order=None, main: bool = True) -> None:
        ordered_listing(source, order)  # a bad input (or order) fails here, before an output is replaced
        if main:
            warn_nested_outputs(source, "input folder")

    def read(self, source, *, order=None, resize=None, skip_bad: bool = False, progress: bool = False, **_):
        return read_image_folder(source, resize=resize, skip_bad=skip_bad, progress=progress, order=order)

    def ingest(self, source, work, *, order=None, resize=None, skip_bad: bool = False, workers=None,
               progress: bool = True, stats=None, main: bool = True, barrier=None, **_):
        if not main:  # rank 0 ingests; the others open its array
            barrier()
            return ingest_folder(source, work, resize=resize, progress=False, skip_bad=skip_bad, order=order)
        data = ingest_folder(source, work, resize=resize, skip_bad=skip_bad, workers=workers, progress=progress,
                             stats=stats, order=order)
        if barrier is not None:
            barrier()
        return data
