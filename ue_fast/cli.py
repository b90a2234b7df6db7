"""Command line: ``ue-fast protect``, ``evaluate``, ``plot``, ``demo``, ``check``."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from .data.apbench import APBENCH_DATASETS, APBENCH_TYPES
from .devices import resolve_device
from .evaluate.defenses import DEFENSES
from .generation import COMPILE_MODES, DELTA_DTYPES
from .generation.store import STORES, parse_size
from .methods import METHODS
from .methods.settings import parse_sets
from .models import ARCHS, SURROGATE_ARCHS
from .protect import ROUNDINGS

PRESETS = sorted({name for cls in METHODS.values() for name in cls.presets})


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


def _percent(fraction: float) -> str:
    """A fraction as a percentage with its precision: 100%, 99.8%, 0.1%, 0.0013%; 0% only for 0."""
    if fraction == 0:
        return "0%"
    p = 100 * fraction
    for digits in range(3, 10):  # never round a partial change to 100%
        text = f"{p:.{digits}g}"
        if p == 100 or float(text) != 100:
            break
    return f"{text}%"


def _print_summary(m: dict) -> None:
    budget = m.get("budget") or {"kind": "linf"}
    bound = f"eps {m['settings']['eps_255']}/255" if budget["kind"] == "linf" else f"not L-inf: {budget['kind']}"
    print(f"protected {m['num_images']} images of {len(m['classes'])} classes with {m['method']} "
          f"({bound}, max |delta| {m['linf_max_255']}/255, mean "
          f"{m['mean_abs_delta_255']:.2f}/255, {_percent(m['changed_pixels_fraction'])} of pixels changed) in "
          f"{m['total_s']:.1f} s; {m['images_per_s']:.0f} images/s per outer epoch")
    files = ["PNG tree"] + [k for k, v in m["outputs"].items() if k != "images" and v["written"]] + ["manifest.json"]
    print(f"output: {m['output']}  ({', '.join(files)})")
    key = m.get("key")
    if key:
        print(f"key: written to {key['key_file']}" if key["key_file"] else
              "key: withheld (in none of the outputs; --key-file PATH keeps a copy)")
    for name, v in m["outputs"].items():
        if not v["written"]:
            print(f"not written: {name}: {v['why']}")


def _print_profile(m: dict) -> None:
    t = m["timings_s"]
    total = sum(t.values())
    print("time per stage:")
    for k, v in sorted(t.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<20} {v:9.2f} s  {100 * v / total:5.1f} %")


def _protect_reporting(*args, **kwargs) -> dict:
    """``protect``, its warnings shown when it ends (after the progress bars), every time, each
    of ue_fast's as one ``warning:`` line (see :func:`_show_warning`)."""
    from .protect import protect

    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            return protect(*args, **kwargs)
    finally:  # outside the recording context: showing a warning there would record it again
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _unchanged_status(m: dict) -> int:
    """1 (with an error line) when the run changed no image at all, else 0."""
    if m["unchanged_images"] == m["num_images"]:
        print(f"error: no image changed: the outputs in {m['output']} equal the inputs (see the warning above)",
              file=sys.stderr)
        return 1
    return 0


def _settings(args) -> dict:
    """The method's settings from its flags and ``--set KEY=VALUE`` (a key given both ways is refused)."""
    flags = dict(epochs=args.epochs, pgd_steps=args.pgd_steps, arch=args.arch, loss=args.loss,
                 batch_size=args.batch_size, poison_batch_size=args.poison_batch_size, seed=args.seed)
    names = METHODS[args.method].config_class.names()
    for key, value in parse_sets(args.set).items():
        if key == "eps":
            raise ValueError("set the budget with --eps (in units of 1/255), not --set eps")
        if key not in names:
            raise ValueError(f"method {args.method!r} has no setting {key!r}; its settings: {sorted(names)}")
        if flags.get(key) is not None:
            raise ValueError(f"{key} is given both as --{key.replace('_', '-')} and by --set")
        flags[key] = value
    return flags


def _cmd_protect(args) -> int:
    m = _protect_reporting(args.input_dir, args.output_dir, method=args.method, eps=args.eps, device=args.device,
                           resize=args.resize, skip_bad=args.skip_bad, resume=args.resume,
                           overwrite=args.overwrite, progress=not args.no_progress, profile=args.profile,
                           keep_checkpoint=args.keep_checkpoint, compile=args.compile or False, sparse=args.sparse,
                           rounding=args.rounding, preset=args.preset, delta_dtype=args.delta_dtype,
                           store=args.store, memory_budget=args.memory_budget, workers=args.workers,
                           sync_bn=args.sync_bn, float64=args.float64, order=args.order, split=args.split,
                           key_file=args.key_file, **_settings(args))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave the group before exiting: a process that exits inside it may abort in gloo's threads.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return _unchanged_status(m)
    _print_summary(m)
    if args.profile:
        _print_profile(m)
        print(f"torch.profiler trace of the first outer epoch: {Path(m['output']) / 'profile_trace.json'}")
    return _unchanged_status(m)


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
    from .methods.settings import parse_sets

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


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate
    from .evaluate.run import summary_lines

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


def _cmd_plot(args) -> int:
    from .evaluate import load_results, plot_curves
    from .outputs import check_output_file

    check_output_file(args.out, {f"results file {p}": p for p in args.results}, "--out", kind="png",
                      suffixes=(".png",))
    docs = [load_results(p) for p in args.results]
    print(f"wrote {plot_curves(docs, args.out)}")
    return 0


def _cmd_report(args) -> int:
    from .evaluate.report import report

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


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ratio_list(text: str) -> list[float]:
    try:
        return [float(t) for t in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--poison-ratios takes fractions separated by commas, got {text!r}") from None


def _cmd_export_apbench(args) -> int:
    from .data.apbench import APBenchExportWarning, export_apbench

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


def _cmd_demo(args) -> int:
    from .data import demo_dir, read_image_folder
    from .evaluate import train_victim

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


def _cmd_check(args) -> int:
    from . import __version__
    from .check import run_checks
    from .ops._dispatch import interpret_mode

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


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="ue-fast", description="Fast generation of unlearnable examples.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("protect", help="turn an image folder into its unlearnable copy",
                        description="Protect INPUT_DIR (class sub-folders of images, or a CIFAR/SVHN/array data set "
                        "in its own index order) into OUTPUT_DIR: a PNG copy of the tree with bounded perturbations, "
                        "perturbation_int8.npy, poison.pt (when it fits the memory budget) and manifest.json, all in "
                        "the data set's order. Defaults are each method's published CIFAR-10 settings.")
    pr.add_argument("input_dir", type=Path, help="a folder of class sub-folders of images, or a data set in its "
                    "authors' distribution, read in its own index order: cifar-10-batches-py/, "
                    "cifar-100-python/, an SVHN .mat, a .npz with x (uint8 NHWC) and y")
    pr.add_argument("output_dir", type=Path)
    pr.add_argument("--order", type=Path, default=None, metavar="FILE",
                    help="for a folder input: a text file listing its images' relative paths, one per line, in "
                    "the data set's order (e.g. CIFAR-10's index order); every output follows it")
    pr.add_argument("--split", default="train", choices=["train", "test", "extra"],
                    help="which split of a CIFAR or SVHN distribution to protect (default train)")
    pr.add_argument("--method", default="miue", choices=sorted(METHODS))
    pr.add_argument("--arch", default=None, choices=SURROGATE_ARCHS, help="surrogate network (default: the method's, resnet18)")
    pr.add_argument("--eps", type=float, default=None,
                    help="L-inf budget in units of 1/255 (default: the method's, 8; 255 for ops, 2 for sep; "
                    "refused for cuda, which is not an L-inf perturbation)")
    pr.add_argument("--epochs", type=_positive_int, default=None, help="outer epochs / rounds E (default: the method's; 100 for miue)")
    pr.add_argument("--pgd-steps", type=_positive_int, default=None, help="PGD steps K per batch (default: the method's; 10 for miue)")
    pr.add_argument("--loss", default=None, choices=["supcon", "centroid"], help="MI-UE's poison loss (default supcon)")
    pr.add_argument("--batch-size", type=_positive_int, default=None, help="surrogate batch (default: the method's; 128 for miue)")
    pr.add_argument("--poison-batch-size", type=_positive_int, default=None, help="PGD batch (default: the method's; 512 for miue)")
    pr.add_argument("--device", default=default_device, help=f"cpu, cuda or cuda:N (default {default_device})")
    pr.add_argument("--seed", type=int, default=None, help="random seed (default 7)")
    pr.add_argument("--resize", type=_resize, default=None, help="resize every image to N or HxW")
    pr.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    pr.add_argument("--resume", action="store_true", help="continue an interrupted run in OUTPUT_DIR")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace OUTPUT_DIR if it holds an earlier ue_fast output (anything else is refused)")
    pr.add_argument("--profile", action="store_true",
                    help="time every stage (synchronising), print the breakdown, and write a torch.profiler "
                    "trace of the first outer epoch to OUTPUT_DIR/profile_trace.json")
    pr.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                    help="torch.compile the surrogate (MODE default, reduce-overhead = with CUDA graphs, "
                    "or max-autotune); the first outer epoch pays the compilation")
    pr.add_argument("--sparse", type=float, default=None, metavar="K",
                    help="SALM: perturb only the K%% most salient pixels of each image (surrogate-based methods)")
    pr.add_argument("--preset", default=None, choices=PRESETS,
                    help="a named set of the method's settings: paper (its authors' published settings, the "
                    "default) or cpu-small (a schedule that protects measurably on a CPU in minutes); the "
                    "other flags and --set override it")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any setting of the method's config (repeatable), e.g. --set alpha=0.8/255 --set "
                    "post_aug=False; values are Python literals or N/D fractions. An unknown key or a bad value "
                    "is refused before anything is read or written")
    pr.add_argument("--delta-dtype", default="auto", choices=list(DELTA_DTYPES),
                    help="how perturbations are kept between PGD passes: auto (default: float32, float16 when "
                    "float32 does not fit the memory budget), float32, float16, or int8 (whole grey levels, "
                    "rounded stochastically)")
    pr.add_argument("--store", default="auto", choices=list(STORES),
                    help="where images and perturbations live while generating: memory (the device or host "
                    "memory), disk (OUTPUT_DIR/.ue_fast, streamed by batches: flat memory at any N), or auto "
                    "(default: memory while they fit --memory-budget, else disk)")
    pr.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                    help="host memory images + perturbations may take, e.g. 8G or 500M (default: half of the "
                    "memory available at the start); poison.pt is written only when it fits too")
    pr.add_argument("--workers", type=_positive_int, default=None,
                    help="processes decoding the input folder (default: the CPUs, at most 16)")
    pr.add_argument("--sync-bn", action="store_true",
                    help="under torchrun: batch norm takes its training statistics over the global batch, so the "
                    "run matches one process's to float tolerance")
    pr.add_argument("--float64", action="store_true",
                    help="compute in double precision (slower: 2x on a CPU, far more on GPUs; no bf16): to check "
                    "that a torchrun run gives one process's result, which float32 rounding amplified by SGD "
                    "otherwise blurs")
    pr.add_argument("--rounding", default="stochastic", choices=list(ROUNDINGS),
                    help="how the 8-bit output rounds x + delta: stochastic (default; keeps sub-grey-level "
                    "perturbations in expectation) or nearest")
    pr.add_argument("--key-file", default=None, metavar="PATH",
                    help="a keyed method (cuda): write its private key (seed and filters, JSON) to this new file; "
                    "without it the key is in none of the outputs")
    pr.add_argument("--keep-checkpoint", action="store_true", help="keep OUTPUT_DIR/.ue_fast (the checkpoint, the ingested images, a disk store's files)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.set_defaults(func=_cmd_protect)

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

    pl = sub.add_parser("plot", help="overlay the accuracy curves of several `evaluate` results files")
    pl.add_argument("results", type=Path, nargs="+", help="results JSON files from `ue-fast evaluate --out`")
    pl.add_argument("--out", type=Path, required=True, help="PNG to write")
    pl.set_defaults(func=_cmd_plot)

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

    d = sub.add_parser("demo", help="protect the demo subset shipped with the package (a few minutes on a CPU)")
    d.add_argument("--output-dir", type=Path, default=Path("ue_fast_demo"),
                   help="where to write (default ue_fast_demo); an earlier ue_fast output there is replaced, "
                   "any other non-empty folder is refused")
    d.add_argument("--device", default=default_device)
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--no-eval", action="store_true", help="skip training the two victims afterwards")
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("check", help="run every op on every available backend against the reference")
    c.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch", type=int, default=None,
                   help="batch size of the test inputs (default 512; 64 under TRITON_INTERPRET=1)")
    c.set_defaults(func=_cmd_check)
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
        from .outputs import explain_os_error

        what = explain_os_error(exc)
        if what is None:
            raise
        print(f"error: {what}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last finished step (round or epoch) is in OUTPUT_DIR/.ue_fast/checkpoint.pt; "
              "run again with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
