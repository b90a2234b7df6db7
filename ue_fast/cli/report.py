"""``ue-fast report``: every victim x defence x poison ratio of a protection, against clean references."""
from __future__ import annotations

from pathlib import Path

from ..evaluate.defenses import DEFENSES
from ..models import ARCHS
from ._args import (
    _comma_list,
    _count,
    _defense_option_argument,
    _defense_options,
    _detect_arguments,
    _positive_float,
    _positive_int,
    _ratio_list,
    _resize,
)


def _cmd_report(args) -> int:
    from ..evaluate.report import report

    doc = report(args.protected, args.clean, args.test, args.out, archs=args.archs, defenses=args.defenses,
                 poison_ratios=args.poison_ratios, epochs=args.epochs, ud=args.ud, ud_samples=args.ud_samples or None,
                 ud_iters=args.ud_iters, ud_rho=args.ud_rho, order=args.order, resize=args.resize,
                 device=args.device, seed=args.seed, batch_size=args.batch_size, lr=args.lr, adv_eps=args.adv_eps,
                 adv_norm=args.adv_norm, jpeg_quality=args.jpeg_quality, detect=args.detect,
                 detect_epochs=args.detect_epochs, detect_model=args.detect_model, learners=args.learner,
                 probe_epochs=args.probe_epochs, defense_options=_defense_options(args.defense_option),
                 label=args.label, progress=not args.no_progress)
    print((args.out / "report.md").read_text(), end="")
    print(f"report: {args.out / 'report.md'}, {args.out / 'heatmap.png'}, {args.out / 'report.json'} "
          f"({len(doc['cells'])} cells, {doc['elapsed_s']:.0f} s)")
    return 0


def add_parser(sub, default_device: str) -> None:
    """The ``report`` subcommand."""
    rp = sub.add_parser("report", help="every victim x defence x poison ratio of a protection, with clean "
                        "references: markdown table, heatmap PNG, JSON; resumes after an interruption",
                        description="Train a victim for every cell of victims x defences x poison ratios on the "
                        "protected set, and the same victims under the same defences on its clean counterparts; "
                        "each finished cell is cached under REPORT_DIR/cells, so a rerun resumes.")
    rp.add_argument("protected", type=Path, metavar="PROTECTED_DIR",
                    help="a protect output, or another tool's poisons against --clean (an APBench poison folder, "
                    "a poison.pt/.npy)")
    rp.add_argument("--clean", type=Path, required=True, metavar="CLEAN_TRAIN_DIR",
                    help="the clean training set: the protected images' counterparts, or the base set of "
                    "another tool's poisons in its own order (a data set, or a folder with --order)")
    rp.add_argument("--test", type=Path, required=True, metavar="CLEAN_TEST_DIR", help="the clean test set")
    rp.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    rp.add_argument("--archs", type=_comma_list, default=["resnet18"], metavar="A,B",
                    help=f"victims (default resnet18; from {', '.join(ARCHS)})")
    rp.add_argument("--defenses", type=_comma_list, default=list(DEFENSES), metavar="D,E",
                    help=f"defences (default all: {', '.join(DEFENSES)})")
    rp.add_argument("--poison-ratios", type=_ratio_list, default=[1.0], metavar="P,Q",
                    help="fractions of the training set protected (default 1)")
    rp.add_argument("--epochs", type=_positive_int, default=40, help="victim epochs (default 40)")
    rp.add_argument("--ud", action="store_true", help="also the unlearnable distance of every cell")
    rp.add_argument("--ud-samples", type=_count, default=2048, metavar="N", help="UD's images (default 2048; 0: all)")
    rp.add_argument("--ud-iters", type=_positive_int, default=10, help="UD's rounds (default 10)")
    rp.add_argument("--ud-rho", type=_positive_float, default=0.05, help="UD's relative ball (default 0.05)")
    rp.add_argument("--order", type=Path, default=None, metavar="FILE", help="order file of a --clean image folder")
    rp.add_argument("--adv-eps", type=float, default=8, help="adv-train radius in units of 1/255 (default 8)")
    rp.add_argument("--adv-norm", default="linf", choices=["linf", "l2"], help="adv-train's norm (default linf)")
    rp.add_argument("--jpeg-quality", type=int, default=10, metavar="Q", help="quality of the jpeg defence (10)")
    rp.add_argument("--batch-size", type=_positive_int, default=128)
    rp.add_argument("--lr", type=_positive_float, default=None,
                    help="peak learning rate of every victim (default: each arch's recipe, 0.1 SGD; 1e-3 AdamW)")
    rp.add_argument("--device", default=default_device, help=f"cpu, cuda or cuda:N (default {default_device})")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--resize", type=_resize, default=None, help="resize every image to N or HxW")
    _detect_arguments(rp)
    _defense_option_argument(rp)
    rp.add_argument("--learner", type=_comma_list, default=["supervised"], metavar="L,M",
                    help="an axis like --archs: supervised (the victims under --defenses, default) and contrastive "
                    "learners, simclr and moco (APBench's: pretrained --epochs epochs without labels, then a linear "
                    "probe), each a row of its own per victim, with no other defence, at ratio 1")
    rp.add_argument("--probe-epochs", type=_positive_int, default=100, metavar="N",
                    help="epochs of a contrastive learner's linear probe (default 100)")
    rp.add_argument("--label", default=None, help="the report's title")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=_cmd_report)
