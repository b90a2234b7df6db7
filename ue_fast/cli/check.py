"""``ue-fast check``: every op on every available backend against the reference."""
from __future__ import annotations

import torch


def _cmd_check(args) -> int:
    from .. import __version__
    from ..check import run_checks
    from ..ops._dispatch import interpret_mode

    print(f"ue_fast {__version__}, torch {torch.__version__}, device {args.device}")
    if interpret_mode() and args.device == "cpu":
        print("TRITON_INTERPRET=1: Triton runs in its CPU interpreter; its times say nothing of kernel speed")
    rows = run_checks(args.device, seed=args.seed, batch=args.batch)
    width = max(len(r["op"]) for r in rows)
    for r in rows:
        print(f"  {r['op']:<{width}}  {r['backend']:<7} {r['status']:<12} {r['detail']}")
    bad = [r for r in rows if r["status"] == "MISMATCH"]
    ran = [r for r in rows if r["status"] == "ok"]
    print(f"{len(ran)} op/backend pairs match the float64 reference"
          + (f", {len(bad)} do NOT" if bad else "") + f"; {len(rows) - len(ran) - len(bad)} unavailable here.")
    return 1 if bad else 0


def add_parser(sub, default_device: str) -> None:
    """The ``check`` subcommand."""
    c = sub.add_parser("check", help="run every op on every available backend against the reference")
    c.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch", type=int, default=None,
                   help="batch size of the test inputs (default 512; 64 under TRITON_INTERPRET=1)")
    c.set_defaults(func=_cmd_check)
