"""``ue-fast protect``: its parser, its command, and the summary it prints (``demo`` prints it too)."""
from __future__ import annotations

import gc
import os
import sys
import warnings
from pathlib import Path

import torch

from ..checkpoint import CHECKPOINT_EVERY
from ..generation import COMPILE_MODES, DELTA_DTYPES
from ..generation.placement import STORES
from ..methods import METHODS
from ..methods.settings import parse_sets
from ..models import SURROGATE_ARCHS
from ..data.png import PNG_LEVEL
from ..data.sinks.poison_pt import POISON_PT_AUTO, POISON_PT_MODES
from ..protect import ROUNDINGS
from ._args import _positive_int, _resize, _size

PRESETS = sorted({name for cls in METHODS.values() for name in cls.presets})


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
    names = {"images": "PNG tree", "webdataset": "WebDataset shards", "apbench": "APBench's poison layout"}
    files = [names.get(k, k) for k, v in m["outputs"].items() if v["written"]] + ["manifest.json"]
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
    from ..protect import protect

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


def _robust_settings(items: list[str]) -> dict | None:
    """``--robust-set KEY=VALUE`` as strings, checked by ``RobustSettings.from_dict``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--robust-set takes KEY=VALUE, e.g. share=0.5; got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out or None


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
                           robust=args.robust, robust_settings=_robust_settings(args.robust_set),
                           rounding=args.rounding, preset=args.preset, delta_dtype=args.delta_dtype,
                           store=args.store, memory_budget=args.memory_budget, workers=args.workers,
                           sync_bn=args.sync_bn, float64=args.float64, order=args.order, split=args.split,
                           key_file=args.key_file, output_format=args.output_format, image_key=args.image_key,
                           png_compression=args.png_compression, checkpoint_every=args.checkpoint_every,
                           poison_pt=args.poison_pt,
                           label_key=args.label_key, **_settings(args))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave the group before exiting: a process that exits inside it may abort in gloo's threads.
        # Collect the run's objects first: one left in a reference cycle would keep the group alive
        # until Python's final collection, where gloo's thread aborts the process.
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return _unchanged_status(m)
    _print_summary(m)
    if args.profile:
        _print_profile(m)
        print(f"torch.profiler trace of the first outer epoch: {Path(m['output']) / 'profile_trace.json'}")
    return _unchanged_status(m)


def add_parser(sub, default_device: str) -> None:
    """The ``protect`` subcommand: its arguments in four groups (input, method, run, output)."""
    pr = sub.add_parser("protect", help="turn an image folder into its unlearnable copy",
                        description="Protect INPUT_DIR (class sub-folders of images, a CIFAR/SVHN/array data set "
                        "in its own index order, WebDataset shards, a Parquet table or an LMDB environment) into OUTPUT_DIR: a PNG copy of the tree with bounded perturbations, "
                        "perturbation_int8.npy, poison.pt (when it fits the memory budget) and manifest.json, all in "
                        "the data set's order. Defaults are each method's published CIFAR-10 settings.")
    _add_input_args(pr.add_argument_group("the input and how it is read"))
    _add_method_args(pr.add_argument_group("the method and its settings"))
    _add_run_args(pr.add_argument_group("the run: device, resume, memory, processes"), default_device)
    _add_output_args(pr.add_argument_group("the outputs"))
    pr.set_defaults(func=_cmd_protect)


def _add_input_args(pr) -> None:
    pr.add_argument("input_dir", type=Path, help="a folder of class sub-folders of images, or a data set in its "
                    "authors' distribution, read in its own index order: cifar-10-batches-py/, "
                    "cifar-100-python/, an SVHN .mat, a .npz with x (uint8 NHWC) and y; or WebDataset shards: "
                    "'shards/train-{000000..000146}.tar' (quoted), a glob, a list file of shard paths, one .tar; or "
                    "a table: .parquet files (one, a glob, a folder of them) or a datasets save_to_disk folder; or an LMDB "
                    "environment of encoded images and labels (read-only; layouts in docs/datasets.md)")
    pr.add_argument("output_dir", type=Path)
    pr.add_argument("--order", type=Path, default=None, metavar="FILE",
                    help="for a folder input: a text file listing its images' relative paths, one per line, in "
                    "the data set's order (e.g. CIFAR-10's index order); every output follows it")
    pr.add_argument("--split", default="train", choices=["train", "test", "extra"],
                    help="which split of a CIFAR or SVHN distribution to protect (default train)")
    pr.add_argument("--resize", type=_resize, default=None, help="resize every image to N or HxW")
    pr.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    pr.add_argument("--workers", type=_positive_int, default=None,
                    help="processes decoding the input folder (default: the CPUs, at most 16)")
    pr.add_argument("--image-key", default=None, metavar="EXT",
                    help="a WebDataset input's image member (default: the first of jpg, jpeg, png, webp, ...); a "
                    "table's image column (default: the first of image, img, png, jpg, ...)")
    pr.add_argument("--label-key", default=None, metavar="FIELD",
                    help="the field of a WebDataset sample's .json that holds its label, an integer or a class "
                    "name (default: the integer in its .cls member); a table's label column (default: the first of "
                    "label, labels, fine_label, ...)")

def _add_method_args(pr) -> None:
    pr.add_argument("--method", default="miue", choices=sorted(METHODS))
    pr.add_argument("--preset", default=None, choices=PRESETS,
                    help="a named set of the method's settings: paper (its authors' published settings, the "
                    "default) or cpu-small (a schedule that protects measurably on a CPU in minutes); the "
                    "other flags and --set override it")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any setting of the method's config (repeatable), e.g. --set alpha=0.8/255 --set "
                    "post_aug=False; values are Python literals or N/D fractions. An unknown key or a bad value "
                    "is refused before anything is read or written")
    pr.add_argument("--arch", default=None, choices=SURROGATE_ARCHS, help="surrogate network (default: the method's, resnet18)")
    pr.add_argument("--eps", type=float, default=None,
                    help="L-inf budget in units of 1/255 (default: the method's, 8; 255 for ops, 2 for sep; "
                    "refused for cuda, which is not an L-inf perturbation)")
    pr.add_argument("--epochs", type=_positive_int, default=None, help="outer epochs / rounds E (default: the method's; 100 for miue)")
    pr.add_argument("--pgd-steps", type=_positive_int, default=None, help="PGD steps K per batch (default: the method's; 10 for miue)")
    pr.add_argument("--loss", default=None, choices=["supcon", "centroid"], help="MI-UE's poison loss (default supcon)")
    pr.add_argument("--batch-size", type=_positive_int, default=None, help="surrogate batch (default: the method's; 128 for miue)")
    pr.add_argument("--poison-batch-size", type=_positive_int, default=None, help="PGD batch (default: the method's; 512 for miue)")
    pr.add_argument("--seed", type=int, default=None, help="random seed (default 7)")
    pr.add_argument("--robust", default=None, metavar="DEFENCES",
                    help="harden the protection against these defences, comma-separated (jpeg, grayscale, bdr): the "
                    "perturbation is optimised through their differentiable forms, drawn per image and step "
                    "(surrogate methods but sep). EXPERIMENTAL: measured at CPU scale it kept less than half of a "
                    "protection's gap under JPEG-10 and grayscale, at a cost to the gap without a defence "
                    "(docs/methods.md)")
    pr.add_argument("--robust-set", action="append", default=[], metavar="KEY=VALUE",
                    help="how --robust draws the defences (repeatable): share=P, the probability an image is "
                    "defended at a PGD step (default 0.5); surrogate=true, the surrogate also trains on defended "
                    "inputs (default false); jpeg_quality=A-B (default 10-30); bdr_bits=A-B (default 2-4)")
    pr.add_argument("--sparse", type=float, default=None, metavar="K",
                    help="SALM: perturb only the K%% most salient pixels of each image (surrogate-based methods)")

def _add_run_args(pr, default_device: str) -> None:
    pr.add_argument("--device", default=default_device, help=f"cpu, cuda or cuda:N (default {default_device})")
    pr.add_argument("--resume", action="store_true", help="continue an interrupted run in OUTPUT_DIR")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace OUTPUT_DIR if it holds an earlier ue_fast output (anything else is refused)")
    pr.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY, metavar="SECONDS",
                    help=f"checkpoint after a step once SECONDS have passed since the last checkpoint (default "
                    f"{CHECKPOINT_EVERY:g}: a crash loses at most that much work; 0: after every step). --resume is "
                    "exact from any checkpoint; each writes the whole perturbation store, which after every step "
                    "of a fast method (ops, pil) costs more than the method")
    pr.add_argument("--keep-checkpoint", action="store_true", help="keep OUTPUT_DIR/.ue_fast (the checkpoint, the ingested images, a disk store's files)")
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
    pr.add_argument("--sync-bn", action="store_true",
                    help="under torchrun: batch norm takes its training statistics over the global batch, so the "
                    "run matches one process's to float tolerance")
    pr.add_argument("--float64", action="store_true",
                    help="compute in double precision (slower: 2x on a CPU, far more on GPUs; no bf16): to check "
                    "that a torchrun run gives one process's result, which float32 rounding amplified by SGD "
                    "otherwise blurs")
    pr.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                    help="torch.compile the surrogate (MODE default, reduce-overhead = with CUDA graphs, "
                    "or max-autotune); the first outer epoch pays the compilation")
    pr.add_argument("--profile", action="store_true",
                    help="time every stage (synchronising), print the breakdown, and write a torch.profiler "
                    "trace of the first outer epoch to OUTPUT_DIR/profile_trace.json")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")

def _add_output_args(pr) -> None:
    pr.add_argument("--output-format", default="png", metavar="FORMAT",
                    help="how the protected images are written: png (default: the PNG tree), webdataset (shards "
                    "with the input's names, keys and non-image members, each image as <key>.png; for a WebDataset "
                    "input), parquet (the input table's files and columns, each image as PNG bytes; for a Parquet "
                    "or datasets input) or apbench (APBench's <method>_poisons/<key>/data/<index>.png, OUTPUT_DIR "
                    "being its dataset/ folder; for a CIFAR-10, CIFAR-100 or SVHN training set read from its own "
                    "files). Lossy formats (jpeg) are refused: their compression is itself a defence")
    pr.add_argument("--poison-pt", default="auto", choices=list(POISON_PT_MODES),
                    help="when poison.pt (float32, 4 bytes a pixel: the MI-UE and EM scripts' format) is written: "
                    f"auto (default: up to {POISON_PT_AUTO / 2**30:g} GiB, CIFAR and SVHN whole, and within "
                    "--memory-budget), yes (whenever it fits --memory-budget) or no; the .npy holds the same "
                    "perturbations either way")
    pr.add_argument("--png-compression", type=int, default=PNG_LEVEL, choices=range(10), metavar="0-9",
                    help=f"zlib level of the PNGs written (default {PNG_LEVEL}: 1.3-1.4x faster to encode than "
                    "Pillow's 6, files up to 10%% larger; the pixels are the same at every level)")
    pr.add_argument("--rounding", default="stochastic", choices=list(ROUNDINGS),
                    help="how the 8-bit output rounds x + delta: stochastic (default; keeps sub-grey-level "
                    "perturbations in expectation) or nearest")
    pr.add_argument("--key-file", default=None, metavar="PATH",
                    help="a keyed method (cuda): write its private key (seed and filters, JSON) to this new file; "
                    "without it the key is in none of the outputs")
