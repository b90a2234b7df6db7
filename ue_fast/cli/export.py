"""``ue-fast export-apbench``: a protected folder in APBench's layout."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..data.apbench import APBENCH_DATASETS, APBENCH_TYPES


def _cmd_export_apbench(args) -> int:
    from ..data.apbench import APBenchExportWarning, export_apbench

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", APBenchExportWarning)
        out = export_apbench(args.protected_dir, args.root, poison_type=args.type, dataset=args.dataset,
                             order=args.order, allow_folder_order=args.allow_folder_order, overwrite=args.overwrite)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    n = sum(1 for _ in out.rglob("*.png"))
    where = out.parent / "index.json" if out.name == "data" else out / "index.json"
    print(f"wrote {n} PNGs named by data-set index to {out} (index -> source and label: {where})")
    return 0


def add_parser(sub, default_device: str) -> None:
    """The ``export-apbench`` subcommand."""
    ex = sub.add_parser("export-apbench", help="copy a protected folder into APBench's layout",
                        description="Write PROTECTED_DIR's PNGs as ROOT/<type>_poisons/<dataset>/data/<index>.png "
                        "(imagenet100: ROOT/<type>_poisons/imagenet100/<class>/<index>.png) for APBench's train.py, "
                        "ROOT being the dataset/ folder it reads. The index is the data set's order recorded in the "
                        "manifest (a CIFAR/SVHN distribution's own, or protect --order's); a folder protected in "
                        "its sorted order needs --order or --allow-folder-order.")
    ex.add_argument("protected_dir", type=Path)
    ex.add_argument("root", type=Path, help="APBench's dataset folder")
    ex.add_argument("--type", default=None, metavar="NAME",
                    help="poison type in the folder name (default: the method's name); APBench's train.py "
                    f"accepts only {', '.join(APBENCH_TYPES)} (a warning says so otherwise)")
    ex.add_argument("--method", dest="type", default=None, help=argparse.SUPPRESS)  # the flag's former name
    ex.add_argument("--dataset", default="c10", choices=list(APBENCH_DATASETS), help="APBench data-set key "
                    "(default c10)")
    ex.add_argument("--order", type=Path, default=None, help="text file: the source paths in the data set's order")
    ex.add_argument("--allow-folder-order", action="store_true",
                    help="export a folder protected in its sorted order as if that were the data set's order")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(func=_cmd_export_apbench)
