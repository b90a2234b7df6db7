"""Command line: ``ue-fast protect``, ``evaluate``, ``report``, ``plot``, ``export-apbench``, ``demo``,
``check``. One module per subcommand holds its parser (``add_parser``) and its command;
``_args`` holds the argument types and arguments several of them share."""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from ..devices import resolve_device
from . import check, demo, evaluate, export, plot, protect, report
from .protect import PRESETS, _percent  # noqa: F401 (part of the module's former namespace)

SUBCOMMANDS = (protect, evaluate, report, plot, export, demo, check)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="ue-fast", description="Fast generation of unlearnable examples.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub, default_device)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """ue_fast's own warnings as one ``warning:`` line; others as Python prints them."""
    if category.__module__.startswith("ue_fast"):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    if args.command == "check" and args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible to torch", file=sys.stderr)
        return 2
    try:
        if getattr(args, "device", None) is not None and args.command != "check":
            resolve_device(args.device)  # one message for a device torch does not know or cannot see
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as exc:  # ImportError: an extra
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing: a full disk, a read-only file system, a permission
        from ..outputs import explain_os_error

        what = explain_os_error(exc)
        if what is None:
            raise
        print(f"error: {what}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last finished step (round or epoch) is in OUTPUT_DIR/.ue_fast/checkpoint.pt; "
              "run again with --resume to continue", file=sys.stderr)
        return 130
