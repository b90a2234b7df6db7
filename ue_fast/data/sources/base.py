"""What every source shares."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ..folders import ImageSet


class Source:
    """One kind of input, turned into the data set: images, labels, classes, paths (its
    order). ``matches(source)`` says whether the input is of this kind (``SOURCES`` asks
    them in order); ``check`` refuses options that do not apply to it before anything is
    read or written; ``read`` returns the data set in memory (``evaluate``, ``report``);
    ``ingest`` returns it for a protect run, which may keep it in its work folder
    (``work``) and read it back on resume. ``main``: False on a torchrun rank other than
    0, which waits (``barrier``) for rank 0's ingest where a source writes one."""

    name: ClassVar[str]

    def matches(self, source) -> bool:
        raise NotImplementedError

    def check(self, source, *, order=None, split: str = "train", resize=None) -> None:
        pass

    def check_input(self, source, *, order=None, main: bool = True) -> None:
        """Look at the input itself (listing, order file) and refuse a bad one, before an output
        folder is created or replaced; ``main``: warn once, on rank 0."""

    def read(self, source, *, split: str = "train", order=None, resize=None, skip_bad: bool = False,
             progress: bool = False) -> ImageSet:
        raise NotImplementedError

    def ingest(self, source, work: Path, *, split: str = "train", order=None, resize=None, skip_bad: bool = False,
               workers: int | None = None, progress: bool = True, stats: dict | None = None, main: bool = True,
               barrier=None) -> ImageSet:
        """By default, every process reads the input itself (small inputs: arrays, distributions)."""
        return self.read(source, split=split, order=order, resize=resize, skip_bad=skip_bad, progress=progress)
