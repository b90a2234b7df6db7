"""``ue-fast demo``: protect the shipped demo subset and check the protection with two victims."""
from __future__ import annotations

from pathlib import Path

from ..methods import METHODS
from .protect import _print_summary, _protect_reporting, _unchanged_status


def _cmd_demo(args) -> int:
    from ..data import demo_dir, read_image_folder
    from ..evaluate import train_victim

    src = demo_dir() / "train"
    s = METHODS["miue"].preset("cpu-small")
    print(f"ue-fast demo: protecting the shipped CIFAR-10 demo subset ({src}, 1,000 images) with MI-UE's "
          f"cpu-small preset: {s['arch']} surrogate, {s['epochs']} outer epochs x {s['pgd_steps']} PGD steps of "
          f"{s['alpha'] * 255:g}/255, eps 8/255 (the paper's schedule is 100 x 10 on a ResNet-18; see "
          "`ue-fast protect --help`)")
    m = _protect_reporting(src, args.output_dir, device=args.device, overwrite=True,
                           progress=not args.no_progress, preset="cpu-small")
    _print_summary(m)
    if _unchanged_status(m):
        return 1
    if args.no_eval:
        return 0
    print("checking the protection: a cnn-small victim trained 15 epochs on each set, "
          "tested on the 200 clean demo test images ...")
    test = read_image_folder(demo_dir() / "test", progress=False)
    accs = {}
    for name, folder in (("clean", src), ("protected", args.output_dir)):
        data = read_image_folder(folder, progress=False)
        r = train_victim(data.images, data.labels, test.images, test.labels, len(data.classes),
                         arch="cnn-small", epochs=15, device=args.device, progress=not args.no_progress,
                         label=f"on the {name} demo images")
        accs[name] = r.last
    print(f"victim test accuracy: trained on clean {100 * accs['clean']:.1f}%, "
          f"trained on protected {100 * accs['protected']:.1f}% (chance: 10%)")
    return 0


def add_parser(sub, default_device: str) -> None:
    """The ``demo`` subcommand."""
    d = sub.add_parser("demo", help="protect the demo subset shipped with the package (a few minutes on a CPU)")
    d.add_argument("--output-dir", type=Path, default=Path("ue_fast_demo"),
                   help="where to write (default ue_fast_demo); an earlier ue_fast output there is replaced, "
                   "any other non-empty folder is refused")
    d.add_argument("--device", default=default_device)
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--no-eval", action="store_true", help="skip training the two victims afterwards")
    d.set_defaults(func=_cmd_demo)
