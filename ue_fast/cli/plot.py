"""``ue-fast plot``: overlay the accuracy curves of several ``evaluate`` results files."""
from __future__ import annotations

from pathlib import Path


def _cmd_plot(args) -> int:
    from ..evaluate import load_results, plot_curves
    from ..outputs import check_output_file

    check_output_file(args.out, {f"results file {p}": p for p in args.results}, "--out", kind="png",
                      suffixes=(".png",))
    docs = [load_results(p) for p in args.results]
    print(f"wrote {plot_curves(docs, args.out)}")
    return 0


def add_parser(sub, default_device: str) -> None:
    """The ``plot`` subcommand."""
    pl = sub.add_parser("plot", help="overlay the accuracy curves of several `evaluate` results files")
    pl.add_argument("results", type=Path, nargs="+", help="results JSON files from `ue-fast evaluate --out`")
    pl.add_argument("--out", type=Path, required=True, help="PNG to write")
    pl.set_defaults(func=_cmd_plot)
