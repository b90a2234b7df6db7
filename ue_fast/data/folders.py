"""Read and write image-folder trees (``root/<class>/<files>``) as uint8 tensors.

Conventions shared by every reader here:

- Images are held as ``torch.uint8`` ``[N, 3, H, W]`` (CHW, RGB): N*3*H*W bytes,
  4x less than float32; convert to float per batch where it is needed.
- Labels are ``torch.int64`` ``[N]``; label ``i`` is ``classes[i]``.
- ``paths`` are POSIX paths relative to the root, in the order of the images;
  the writer mirrors them, so a protected copy has the same tree.
"""
from __future__ import annotations

import numbers
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

from ..progress import progress as _progress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Pillow's resampling filters are antialiased when they downscale (the kernel
# widens with the scale factor), so BICUBIC is a sound default both ways.
RESIZE_FILTER = Image.Resampling.BICUBIC


@dataclass
class ImageSet:
    """A labelled image set held in memory.

    images:  [N, 3, H, W] uint8 (RGB)
    labels:  [N] int64, in [0, len(classes))
    classes: class names; label i is classes[i] (sorted folder names when read from a tree)
    paths:   [N] POSIX paths relative to the root, e.g. "cat/0001.jpg"
    skipped: {"path": ..., "reason": ...} for each unreadable file skipped with skip_bad
    file:    a uint8 ``.npy`` [N, 3, H, W] holding ``images`` (an ingested folder, whose
             ``images`` is then a memory map of it), or None
    origin:  where index i comes from: {"format": "image-folder", "order": "sorted" or
             "order-file", ...} for a folder, {"format": "cifar10", "order": "index", ...} for
             a data set read in its own order (``ue_fast.data.canonical``); None for arrays
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str]
    skipped: list[dict] = field(default_factory=list)
    file: Path | None = None
    origin: dict | None = None

    def __post_init__(self):
        im, lb = self.images, self.labels
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            desc = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"ImageSet.images must be a uint8 tensor [N, 3, H, W], got {desc}")
        if not isinstance(lb, torch.Tensor) or lb.dtype != torch.int64 or lb.shape != (im.shape[0],):
            desc = f"{lb.dtype} {tuple(lb.shape)}" if isinstance(lb, torch.Tensor) else type(lb).__name__
            raise ValueError(f"ImageSet.labels must be an int64 tensor [{im.shape[0]}], got {desc}")
        if len(self.paths) != im.shape[0]:
            raise ValueError(f"ImageSet has {im.shape[0]} images but {len(self.paths)} paths")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return (self.images.shape[2], self.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------- decoding


def _check_resize(resize) -> tuple[int, int] | None:
    """None, an int (square) or (H, W) -> (H, W) or None."""
    if resize is None:
        return None
    vals = (resize, resize) if isinstance(resize, numbers.Integral) else resize
    if not isinstance(vals, (tuple, list)) or len(vals) != 2:
        raise ValueError(f"resize must be an int or a (height, width) pair, got {resize!r}")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"resize must hold integers, got {resize!r}")
        if v <= 0:
            raise ValueError(f"resize values must be positive, got {resize!r}")
    return (int(vals[0]), int(vals[1]))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB.

    Transparency is composited onto black (transparent pixels become black, i.e.
    premultiplied alpha): the protected copy is written as RGB. 16-bit grayscale is
    scaled to 8 bits (Pillow's own conversion would clip it). CMYK uses Pillow's
    plain conversion (no ICC colour management).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or a.max(initial=0) > 255:  # "I" also holds 16-bit PNGs
            a = a / 257.0
        g = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # [H, W] -> mode L
        return g.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def _load_rgb(src, size: tuple[int, int] | None) -> np.ndarray:
    """Decode ``src`` (a path or a binary file) -> [H, W, 3] uint8, resized to ``size`` = (H, W).

    The EXIF orientation is applied, so the pixels match what an image viewer shows.
    """
    with Image.open(src) as im:
        if size is not None and im.format == "JPEG":
            # Let the JPEG decoder downscale by 2/4/8 first (stays >= 2x the target,
            # then the filter finishes): large photos decode many times faster.
            s = 2 * max(size)
            im.draft(None, (s, s))
        im.load()
        try:
            orientation = im.getexif().get(0x0112, 1)  # 0x0112: EXIF orientation
        except Exception:  # a broken EXIF block does not make the pixels unreadable
            orientation = 1
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
        if size is not None and rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), RESIZE_FILTER)
        return np.array(rgb, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays


def _decode_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------- reading


def _scan(root: Path) -> tuple[list[str], list[list[str]]]:
    """-> (sorted class names, per class the sorted POSIX paths relative to root)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _is_hidden(e.name))
    files = []
    for c in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / c):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]  # e.g. .ipynb_checkpoints
            rel = Path(dirpath).relative_to(root).as_posix()
            found.extend(f"{rel}/{f}" for f in filenames if _is_image(f))
        files.append(sorted(found))
    return classes, files


def scan_image_folder(root) -> tuple[list[str], list[list[str]]]:
    """The classes of ``root`` and, per class, its images' relative paths (the order of
    :func:`read_image_folder`), checked as it documents (missing folder, no classes or
    images, an empty class, a single class)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"image folder is not a directory: {root}")
    classes, files = _scan(root)
    n = sum(len(f) for f in files)
    if n == 0:
        loose = [p.name for p in root.iterdir() if p.is_file() and _is_image(p.name)]
        hint = (f" ({len(loose)} images lie directly in it: put each class in its own sub-folder,"
                " root/<class>/<image>)") if loose else " (expected root/<class>/<image>)"
        raise ValueError(f"empty folder: no images in class sub-folders of {root}{hint}")
    empty = [c for c, f in zip(classes, files) if not f]
    if empty:
        raise ValueError(f"class folder(s) without images in {root}: {', '.join(empty)}; "
                         "remove them or add images")
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least 2 classes (class sub-folders), found 1: {classes[0]!r}")
    return classes, files


def read_order(order) -> list[str]:
    """The paths of an order file (one POSIX path relative to the folder per line; blank
    lines ignored), or of a list given directly."""
    if isinstance(order, (list, tuple)):
        return [str(p) for p in order]
    path = Path(order)
    if not path.is_file():
        raise FileNotFoundError(f"order file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ordered_listing(root, order=None) -> tuple[list[str], list[str], list[int]]:
    """(classes, relative paths, labels) of the image folder ``root`` in the data set's order.

    Without ``order``: classes sorted, then paths sorted within each (what
    :func:`scan_image_folder` lists). With ``order`` (a file or a list of relative paths,
    see :func:`read_order`): exactly those paths in that order, which must name every image
    of the folder once; labels still come from the class folders.
    """
    classes, files = scan_image_folder(root)
    rels = [r for f in files for r in f]
    label_of = {r: i for i, f in enumerate(files) for r in f}
    if order is None:
        return classes, rels, [label_of[r] for r in rels]
    paths = read_order(order)
    unknown = [p for p in paths if p not in label_of]
    if unknown:
        raise ValueError(f"{len(unknown)} path(s) of the order are not images of {root} (e.g. {unknown[0]!r}); "
                         "paths are relative to the folder, e.g. 'cat/0001.jpg'")
    seen, dup = set(), []
    for p in paths:
        if p in seen:
            dup.append(p)
        seen.add(p)
    if dup:
        raise ValueError(f"{len(dup)} path(s) appear more than once in the order (e.g. {dup[0]!r})")
    if len(paths) != len(rels):
        missing = [r for r in rels if r not in seen]
        raise ValueError(f"the order lists {len(paths)} of the {len(rels)} images of {root}; it must list every "
                         f"one (e.g. missing {missing[0]!r})")
    return classes, paths, [label_of[p] for p in paths]


def read_image_folder(root, *, resize: int | tuple[int, int] | None = None, skip_bad: bool = False,
                      progress: bool = True, order=None) -> ImageSet:
    """Read ``root/<class>/<files>`` into an :class:`ImageSet`.

    Each immediate, non-hidden sub-folder of ``root`` is a class; its image files
    (extensions in ``IMAGE_EXTENSIONS``, any case) are found recursively and keep
    their relative path. Files directly in ``root``, hidden files and folders, and
    other extensions are ignored. Classes are sorted by name (label i = classes[i]);
    images are ordered by class, then by relative path, unless ``order`` (an order file or
    a list, see :func:`ordered_listing`) gives the data set's own order.

    Every image is converted to RGB (alpha composited onto black, see ``_to_rgb``)
    with its EXIF orientation applied. All images must share one size unless
    ``resize`` is given: an int (square) or (H, W); every image is then stretched
    to exactly that size with Pillow's antialiased BICUBIC filter (no crop, so the
    aspect ratio is not kept).

    Memory: the images are held as uint8, N*3*H*W bytes (50,000 CIFAR images:
    154 MB; 10,000 at 224x224: 1.5 GB).

    Raises FileNotFoundError if ``root`` does not exist, ValueError (naming the
    path) if it is not a directory, has no class folders or no images, has an
    empty class folder or only one class, holds an unreadable image (unless
    ``skip_bad``: it is then listed in ``ImageSet.skipped``), or holds images of
    different sizes without ``resize``.
    """
    size = _check_resize(resize)
    root = Path(root)
    classes, rels, rel_labels = ordered_listing(root, order)
    n = len(rels)

    images = None  # [N, 3, H, W] uint8, allocated once the first image gives H and W
    labels, paths, skipped = [], [], []
    first = None  # (path, (H, W)) of the first image, named in size errors
    with _progress(n, "reading images", "img", enabled=progress) as bar:
        for label, rel in zip(rel_labels, rels):
            bar.update(1)
            try:
                arr = _load_rgb(root / rel, size)
            except MemoryError:
                raise
            except Exception as e:  # any decoder failure means "unreadable file"
                if not skip_bad:
                    raise ValueError(f"cannot read image {root / rel}: {_decode_error(e)} "
                                     "(pass skip_bad=True / --skip-bad to skip unreadable files)") from e
                skipped.append({"path": rel, "reason": _decode_error(e)})
                continue
            hw = arr.shape[:2]
            if images is None:
                first = (rel, hw)
                images = torch.empty((n, 3, *hw), dtype=torch.uint8)
            elif hw != first[1]:
                raise ValueError(
                    f"images of different sizes in {root}: {first[0]} is {first[1][0]}x{first[1][1]} "
                    f"but {rel} is {hw[0]}x{hw[1]} (HxW); pass resize=(H, W) (--resize) to resize all")
            images[len(paths)] = torch.from_numpy(arr).permute(2, 0, 1)
            labels.append(label)
            paths.append(rel)
    if images is None:
        raise ValueError(f"no readable images in {root}: all {n} files failed to decode "
                         f"(first: {skipped[0]['path']}: {skipped[0]['reason']})")
    if skipped and order is not None:
        raise ValueError(f"{len(skipped)} image(s) of {root} could not be read (first: {skipped[0]['path']}: "
                         f"{skipped[0]['reason']}); with an order file every index must hold its image, so "
                         "none can be skipped: fix or replace them")
    if skipped:
        kept = set(labels)
        gone = [c for i, c in enumerate(classes) if i not in kept]
        if gone:
            raise ValueError(f"no readable images left in class folder(s) {', '.join(gone)} of {root}")
        images = images[: len(paths)]
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), classes, paths, skipped,
                    origin=folder_origin(root, order))


def folder_origin(root, order) -> dict:
    """``ImageSet.origin`` of an image folder read in sorted order or in an order file's."""
    out = {"format": "image-folder", "order": "sorted" if order is None else "order-file", "path": str(root)}
    if order is not None and not isinstance(order, (list, tuple)):
        out["order_file"] = str(order)
    return out


# ----------------------------------------------------------------------------- arrays


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # torch cannot share a read-only buffer
            x = x.copy()
        return torch.from_numpy(x)
    if name == "labels" and isinstance(x, (list, tuple)):
        return torch.as_tensor(x)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def images_from_arrays(images, labels, classes=None) -> ImageSet:
    """Wrap in-memory arrays as an :class:`ImageSet` (the Python-API input).

    images:  numpy array or torch tensor, [N, H, W, 3] (HWC) or [N, 3, H, W] (CHW);
             uint8 (or another integer type in [0, 255]) or float in [0, 1], which is
             rounded to uint8. Where both the last and the second axis are 3, a numpy
             array is read as HWC and a tensor as CHW. May share memory with the input.
    labels:  integer [N], values in [0, C).
    classes: C names (default: zero-padded label numbers, "0".."9" or "00".."99", so
             that a written tree sorts back to the same labels).

    Paths become "<class>/<index:06d>.png" (index in the input order).
    """
    x = _as_tensor(images, "images")
    if x.dim() != 4:
        raise ValueError(f"images must be 4-D, [N, H, W, 3] or [N, 3, H, W], got shape {tuple(x.shape)}")
    hwc = x.shape[-1] == 3 and (x.shape[1] != 3 or isinstance(images, np.ndarray))
    if not hwc and x.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels, as [N, H, W, 3] or [N, 3, H, W]; "
                         f"got shape {tuple(x.shape)}")
    if hwc:
        x = x.permute(0, 3, 1, 2)
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"images is empty: shape {tuple(x.shape)} as [N, 3, H, W]")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"images must be uint8, integer or float, got dtype {x.dtype}")
    if x.is_floating_point():
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"float images must lie in [0, 1], found values in [{lo}, {hi}]")
        # float32 is exact enough (k/255 * 255 lands within 1e-4 of k) and, unlike
        # float64, adds no temporary larger than the input
        x = (x.to(torch.float32) * 255.0).round_().to(torch.uint8)
    elif x.dtype != torch.uint8:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"integer images must lie in [0, 255], found values in [{lo}, {hi}] ({x.dtype})")
        x = x.to(torch.uint8)
    x = x.contiguous()
    n = x.shape[0]

    y = _as_tensor(labels, "labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"labels must have shape [{n}] (one per image), got {tuple(y.shape)}")
    y = y.to(torch.int64).clone()
    lo, hi = int(y.min()), int(y.max())
    if classes is None:
        if lo < 0:
            raise ValueError(f"labels must be >= 0, found {lo}")
        width = len(str(hi))
        classes = [f"{i:0{width}d}" for i in range(hi + 1)]
    else:
        classes = [str(c) for c in classes]
        if lo < 0 or hi >= len(classes):
            raise ValueError(f"labels must lie in [0, {len(classes)}) for {len(classes)} classes, "
                             f"found {lo if lo < 0 else hi}")
    for c in classes:
        if c in ("", ".", "..") or "/" in c or "\\" in c or _is_hidden(c):
            raise ValueError(f"class name {c!r} cannot be a folder name")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    present = int(torch.unique(y).numel())
    if len(classes) < 2 or present < 2:
        raise ValueError(f"needs at least 2 classes, got {len(classes)} class name(s) and "
                         f"{present} distinct label value(s)")
    width = max(6, len(str(n - 1)))  # keeps string order == index order
    paths = [f"{classes[int(c)]}/{i:0{width}d}.png" for i, c in enumerate(y.tolist())]
    return ImageSet(x, y, classes, paths)


# ----------------------------------------------------------------------------- writing


def output_paths(paths: list[str]) -> list[str]:
    """The relative PNG paths :func:`write_image_folder` writes for ``paths``.

    Raises ValueError for an absolute path, one with "..", or two inputs that map to
    the same output (e.g. "cat/a.jpg" and "cat/a.png").
    """
    out, seen = [], {}
    for p in paths:
        pp = PurePosixPath(p)
        if not str(p) or pp.is_absolute() or ".." in pp.parts or pp.name in ("", "."):
            raise ValueError(f"output path must be relative, inside the output folder: {p!r}")
        o = pp.with_suffix(".png").as_posix()
        if o in seen:
            raise ValueError(f"{seen[o]!r} and {p!r} would both be written to {o!r}: rename one "
                             "(PNG output replaces every extension)")
        seen[o] = p
        out.append(o)
    return out


def write_image_folder(out_root, images: torch.Tensor, paths: list[str], *, progress: bool = False) -> list[str]:
    """Write images [N, 3, H, W] uint8 as PNG files at ``out_root/<paths[i]>``.

    The extension becomes ".png": PNG is lossless, while a JPEG would wash out an
    8-bit perturbation. Sub-folders are created. Each file is written to a hidden
    temporary name and renamed, so an interrupted run leaves no truncated PNG (no
    fsync per file: that would cost more than the encoding). Collisions are checked
    before anything is written. Returns the written relative paths.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor [N, 3, H, W], got {desc}")
    paths = list(paths)
    if len(paths) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(paths)} paths")
    outs = output_paths(paths)
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise ValueError(f"output folder is not a directory: {out_root}")
    images = images.cpu()
    for d in sorted({str(PurePosixPath(o).parent) for o in outs}):
        (out_root / d).mkdir(parents=True, exist_ok=True)
    with _progress(len(outs), "writing images", "img", enabled=progress) as bar:
        for i, o in enumerate(outs):
            bar.update(1)
            dest = out_root / o
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(tmp, format="PNG")
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    return outs


def demo_dir() -> Path:
    """The demo subset shipped in the package: ``demo/train/<class>/*.jpg`` and
    ``demo/test/<class>/*.jpg`` (CIFAR-10 images, see demo/README.md)."""
    d = Path(__file__).resolve().parent / "demo"
    if not (d / "train").is_dir():
        raise FileNotFoundError(f"the demo subset is missing from this installation: {d}")
    return d
