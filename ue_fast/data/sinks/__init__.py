"""Sinks: the output formats of ``protect``, each written by chunks of rows in the data
set's order (memory stays bounded whatever N) and each reporting what it wrote and why.

================== ============================================================
images             the PNG tree (``png_tree.py``)
npy                ``perturbation_int8.npy`` / ``_int16`` (``npy.py``)
poison.pt          float32 perturbations, when they fit the memory budget (``poison_pt.py``)
poison_classwise.pt  a class-wise method's [C, 3, H, W] rows (``classwise.py``)
================== ============================================================

Adding one is a file with a :class:`Sink` and a line in ``SINKS``.
"""
from __future__ import annotations

from .base import Rows, Sink, SinkContext
from .classwise import PoisonClasswise
from .npy import PerturbationNpy, npy_name
from .png_tree import PNGTree
from .poison_pt import PoisonPt

SINKS = {cls.name: cls for cls in (PNGTree, PerturbationNpy, PoisonPt, PoisonClasswise)}
DEFAULT_SINKS = tuple(SINKS)  # what protect writes, in the manifest's order

__all__ = ["DEFAULT_SINKS", "SINKS", "Rows", "Sink", "SinkContext", "npy_name"]
