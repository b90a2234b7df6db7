"""Sinks: the output formats of ``protect``, each written by chunks of rows in the data
set's order (memory stays bounded whatever N) and each reporting what it wrote and why.

================== ============================================================
images             the PNG tree (``png_tree.py``)
npy                ``perturbation_int8.npy`` / ``_int16`` (``npy.py``)
poison.pt          float32 perturbations, up to 1 GiB by default (``poison_pt.py``)
poison_classwise.pt  a class-wise method's [C, 3, H, W] rows (``classwise.py``)
webdataset         WebDataset shards, the input's members passed through (``webdataset.py``)
parquet            Parquet files, the input table's columns kept (``parquet.py``)
apbench            APBench's ``<method>_poisons/<key>/data/<i>.png`` (``apbench.py``)
================== ============================================================

Adding one is a file with a :class:`Sink` and a line in ``SINKS``.
"""
from __future__ import annotations

from .apbench import APBenchPoisons
from .base import Rows, Sink, SinkContext
from .classwise import PoisonClasswise
from .npy import PerturbationNpy, npy_name
from .png_tree import PNGTree
from .parquet import ParquetFiles
from .poison_pt import PoisonPt
from .webdataset import WebDatasetShards

SINKS = {cls.name: cls for cls in (PNGTree, PerturbationNpy, PoisonPt, PoisonClasswise, WebDatasetShards, ParquetFiles,
                                   APBenchPoisons)}
# The images in one format, then the perturbation files every run writes, in the manifest's order.
OUTPUT_FORMATS = {"png": "images", "webdataset": "webdataset", "parquet": "parquet", "apbench": "apbench"}
LOSSY = {"jpeg", "jpg", "webp-lossy", "avif"}
PERTURBATION_SINKS = ("npy", "poison.pt", "poison_classwise.pt")
DEFAULT_SINKS = ("images", *PERTURBATION_SINKS)


def sinks_for(output_format: str) -> tuple[str, ...]:
    """The sinks of an output format; a lossy one is refused with the reason."""
    if output_format in LOSSY:
        raise ValueError(f"output format {output_format!r} is lossy: its compression is itself a defence that "
                         "strips the perturbation (ISS); choose one of " + ", ".join(OUTPUT_FORMATS))
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; choose one of " + ", ".join(OUTPUT_FORMATS))
    return (OUTPUT_FORMATS[output_format], *PERTURBATION_SINKS)

__all__ = ["DEFAULT_SINKS", "OUTPUT_FORMATS", "SINKS", "Rows", "Sink", "SinkContext", "npy_name", "sinks_for"]
