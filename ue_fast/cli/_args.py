"""What several subcommands share: argument types and the detection and defence-option arguments."""
from __future__ import annotations

import argparse

from ..generation.placement import parse_size


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _count(text: str) -> int:
    v = int(text)
    if v < 0 or v == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or an integer >= 2, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def _resize(text: str):
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resize takes N or HxW, got {text!r}") from None
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--resize takes N or HxW with positive sizes, got {text!r}")
    return vals[0] if len(vals) == 1 else tuple(vals)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ratio_list(text: str) -> list[float]:
    try:
        return [float(t) for t in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--poison-ratios takes fractions separated by commas, got {text!r}") from None


def _detect_arguments(parser) -> None:
    parser.add_argument("--detect", action="store_true",
                        help="also UDP's detection score (Zhu et al., AAAI 2024): a simple network trained on 80%% "
                        "of the training images, its accuracy on the other 20%%; above 0.7 the set is detected. The "
                        "same on the clean counterparts when they are known (--clean, or the manifest's input)")
    parser.add_argument("--detect-model", default="linear", choices=["linear", "2nn"],
                        help="the detection network: linear (default), or the authors' default 2nn, a two-layer "
                        "network with crop and flip that needs their full-scale schedule (on 1,000 images it "
                        "detected not even a blatant class-wise pattern)")
    parser.add_argument("--detect-epochs", type=_positive_int, default=100, metavar="N",
                        help="epochs of the detection network (default 100, the authors')")


def _defense_options(items) -> dict:
    """``["dvae.epochs=10", "coin.severity=7"]`` -> ``{"dvae": {"epochs": 10}, "coin": {"severity": 7}}``."""
    from ..methods.settings import parse_sets

    out: dict[str, dict] = {}
    for item in items or ():
        name, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise ValueError(f"--defense-option takes DEFENSE.KEY=VALUE (dvae.epochs=10), got {item!r}")
        out.setdefault(name.strip(), {}).update(parse_sets([rest]))
    return out


def _defense_option_argument(parser) -> None:
    parser.add_argument("--defense-option", action="append", default=[], metavar="DEFENSE.KEY=VALUE",
                        help="an option of a defence, as get_defense takes it (repeatable): dvae.epochs=10 "
                        "(D-VAE's VAEs, 60 by default), op.epochs=20, coin.severity=7, ueraser.repeats=3")
