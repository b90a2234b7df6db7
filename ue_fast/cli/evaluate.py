"""``ue-fast evaluate``: train a victim on a (protected) set and test it on clean data."""
from __future__ import annotations

from pathlib import Path

from ..evaluate.defenses import DEFENSES
from ..models import ARCHS
from ._args import (
    _count,
    _defense_option_argument,
    _defense_options,
    _detect_arguments,
    _positive_float,
    _positive_int,
    _resize,
)


def _cmd_evaluate(args) -> int:
    from ..evaluate import evaluate
    from ..evaluate.run import summary_lines

    options = _defense_options(args.defense_option)
    if set(options) - {args.defense}:
        raise ValueError(f"--defense-option names {', '.join(sorted(set(options) - {args.defense}))}, not the "
                         f"--defense {args.defense}")
    r = evaluate(args.train, args.test, arch=args.arch, epochs=args.epochs, defense=args.defense,
                 adv_eps=args.adv_eps, adv_norm=args.adv_norm, jpeg_quality=args.jpeg_quality,
                 batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, device=args.device,
                 seed=args.seed, resize=args.resize, mi=args.mi, clean=args.clean, order=args.order,
                 poison_ratio=args.poison_ratio, ud=args.ud, ud_samples=args.ud_samples or None,
                 ud_iters=args.ud_iters, ud_rho=args.ud_rho, out=args.out, progress=not args.no_progress,
                 reference=args.reference, detect=args.detect, detect_epochs=args.detect_epochs,
                 detect_model=args.detect_model, learner=args.learner, probe_epochs=args.probe_epochs,
                 defense_options=options.get(args.defense))
    for line in summary_lines(r):
        print(line)
    if args.out is not None:
        print(f"results: {args.out} (curves: {args.out.with_suffix('.png')})")
    return 0


def add_parser(sub, default_device: str) -> None:
    """The ``evaluate`` subcommand."""
    ev = sub.add_parser("evaluate", help="train a victim on a (protected) folder and test it on clean data",
                        description="Train a victim on TRAIN with the standard recipe (SGD 0.1, momentum 0.9, "
                        "weight decay 5e-4, crop + flip, cosine schedule, batch 128; AdamW 1e-3, weight decay "
                        "0.05 for vit-small and cait-small), optionally under a "
                        "defence, and report clean test accuracy after every epoch (JSON + PNG curves).")
    ev.add_argument("--train", type=Path, required=True,
                    help="training set: a folder of class sub-folders (e.g. a protect output), a data set "
                    "(cifar-10-batches-py/, ...), or another tool's poisons against --clean: an APBench poison "
                    "folder (<type>_poisons/<dataset>/data/<index>.png) or a poison.pt/.npy tensor (sample-wise "
                    "[N,3,H,W] or class-wise [C,3,H,W])")
    ev.add_argument("--test", type=Path, required=True,
                    help="clean test set with the same classes: a folder, or a data set (its test split)")
    ev.add_argument("--arch", default="resnet18", choices=ARCHS, help="victim network (default resnet18)")
    ev.add_argument("--epochs", type=_positive_int, default=40, help="training epochs (default 40)")
    ev.add_argument("--defense", default="none", choices=DEFENSES, help="defence during training (default none)")
    ev.add_argument("--adv-eps", type=float, default=8, help="adv-train radius in units of 1/255 (default 8; "
                    "with --adv-norm l2 the L2 norm of the whole perturbation: 127.5 is 0.5)")
    ev.add_argument("--adv-norm", default="linf", choices=["linf", "l2"], help="adv-train's norm (default linf)")
    ev.add_argument("--jpeg-quality", type=int, default=10, metavar="Q",
                    help="quality (1-100) of --defense jpeg (default 10, as ISS and APBench)")
    ev.add_argument("--batch-size", type=_positive_int, default=128)
    ev.add_argument("--lr", type=_positive_float, default=None,
                    help="peak learning rate (default: the arch's recipe, 0.1 SGD; 1e-3 AdamW for the transformers)")
    ev.add_argument("--weight-decay", type=float, default=None,
                    help="weight decay (default: the arch's recipe, 5e-4; 0.05 for the transformers)")
    ev.add_argument("--device", default=default_device, help=f"cpu, cuda or cuda:N (default {default_device})")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--resize", type=_resize, default=None, help="resize every image to N or HxW")
    ev.add_argument("--mi", action="store_true", help="also report the MI gap and feature statistics "
                    "(trains a second victim on the clean counterparts)")
    ev.add_argument("--clean", type=Path, default=None,
                    help="the clean base set, in its own order, of another tool's poisons (required for them): a "
                    "data set such as cifar-10-batches-py/, or a folder with --order; for --mi, the clean "
                    "counterparts of --train (default: the input named in its manifest.json)")
    ev.add_argument("--order", type=Path, default=None, metavar="FILE",
                    help="order file of a --clean image folder: its relative paths, one per line, in index order")
    ev.add_argument("--poison-ratio", type=float, default=None, metavar="P",
                    help="partial protection: only a class-balanced, seeded fraction P in (0, 1] of the training "
                    "set is protected, the rest clean (needs the clean counterparts: --clean, or the input a "
                    "protect manifest names); a second victim trains on the clean part alone, the reference")
    ev.add_argument("--ud", action="store_true",
                    help="also the unlearnable distance (Ye, Su, Qian): per-layer sharpness-aware learnability after "
                    "every epoch, against a victim trained on the clean counterparts (--clean or the manifest's "
                    "input); 1 for clean data, lower is less learnable")
    ev.add_argument("--ud-samples", type=_count, default=2048, metavar="N",
                    help="training images UD measures on, a class-balanced seeded subset (default 2048; 0 for all)")
    ev.add_argument("--ud-iters", type=_positive_int, default=10, help="UD's descent/ascent rounds (default 10)")
    ev.add_argument("--ud-rho", type=_positive_float, default=0.05, help="UD's relative weight ball (default 0.05)")
    ev.add_argument("--reference", action="store_true",
                    help="also train the same victim, under the same defence, on the clean counterparts (--clean, "
                    "or the input named in the manifest) and print clean and protected accuracy side by side with "
                    "the gap and its standard error (a second training run; --mi, --ud and --poison-ratio train "
                    "one already and give the comparison without it)")
    _detect_arguments(ev)
    _defense_option_argument(ev)
    ev.add_argument("--learner", default="supervised", choices=["supervised", "simclr", "moco"],
                    help="supervised (the victim network, default), or a contrastive learner as APBench's: SimCLR or "
                    "MoCo v2 pretrained --epochs epochs on the training images without labels, then a linear probe "
                    "on its frozen features of the clean counterparts (no --defense, --mi, --ud or --poison-ratio)")
    ev.add_argument("--probe-epochs", type=_positive_int, default=100, metavar="N",
                    help="epochs of a contrastive learner's linear probe (default 100, APBench's)")
    ev.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                    help="results JSON (the curves go beside it as .png); never an input, never over another kind "
                    "of file")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)
