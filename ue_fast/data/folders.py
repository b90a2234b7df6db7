"""Read and write image-folder trees (``root/<class>/<files>``) as uint8 tensors.

Conventions shared by every reader here:

- Images are held as ``torch.uint8`` ``[N, 3, H, W]`` (CHW, RGB): N*3*H*W bytes,
  4x less than float32; convert to float per batch where it is needed.
- Labels are ``torch.int64`` ``[N]``; label ``i`` is ``classes[i]``.
- ``paths`` are POSIX paths relative to the root, in the order of the images;
  the writer mirrors them, so a protected copy has the same tree (names that are not
  valid UTF-8 included: see :mod:`ue_fast.data.decode`).

What is read and how (formats, colours, transparency, huge images) is in
:mod:`ue_fast.data.decode`; what is listed, and what is left out and reported, in
:mod:`ue_fast.data.scan`.
"""
from __future__ import annotations

import os
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from ..progress import progress as _progress
from .decode import (
    _check_resize,
    _decode,
    _decode_error,
    _frames_note,
    _is_hidden,
    display_path,
)
from .scan import list_image_folder


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
    ignored: what under the root was not read as an image, each {"path": ..., "reason": ...,
             "kind": ...} (see :func:`describe_left_out`); "kind" is one of ``IGNORED_KINDS``.
             A multi-frame image is read (its first frame) and also listed here, with kind
             "frames" and "frames": its number of frames.
    alpha:   [N, H, W] uint8, each image's alpha channel (255 where it has none), or None
             when no image of the set has any alpha below 255. A memory map of
             ``work_dir/alpha.npy`` for an ingested folder.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str]
    skipped: list[dict] = field(default_factory=list)
    file: Path | None = None
    origin: dict | None = None
    ignored: list[dict] = field(default_factory=list)
    alpha: torch.Tensor | None = None

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
        a = self.alpha
        if a is not None:
            want = (im.shape[0], im.shape[2], im.shape[3])
            if not isinstance(a, torch.Tensor) or a.dtype != torch.uint8 or tuple(a.shape) != want:
                desc = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"ImageSet.alpha must be None or a uint8 tensor [N, H, W] = {list(want)}, "
                                 f"got {desc}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return (self.images.shape[2], self.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------- reading


def read_image_folder(root, *, resize: int | tuple[int, int] | None = None, skip_bad: bool = False,
                      progress: bool = True, order=None) -> ImageSet:
    """Read ``root/<class>/<files>`` into an :class:`ImageSet`.

    Each immediate, non-hidden sub-folder of ``root`` is a class; its image files
    (extensions in ``IMAGE_EXTENSIONS``, any case: every format Pillow reads) are found
    recursively and keep their relative path. Files directly in ``root``, hidden files
    and folders, and files of other types are not read: each is listed in
    ``ImageSet.ignored`` with its reason. Classes are sorted by name (label i =
    classes[i]); images are ordered by class, then by relative path, unless ``order``
    (an order file or a list, see :func:`ordered_listing`) gives the data set's own order.

    Every image is read as RGB, colours as stored (an alpha channel is kept apart in
    ``ImageSet.alpha``, not composited: see the module docstring), with its EXIF
    orientation applied; a multi-frame file gives its first frame (and is noted in
    ``ignored``). All images must share one size unless ``resize`` is given: an int
    (square) or (H, W); every image (and its alpha) is then stretched to exactly that
    size with Pillow's antialiased BICUBIC filter (no crop, so the aspect ratio is not kept).

    Memory: the images are held as uint8, N*3*H*W bytes (50,000 CIFAR images:
    154 MB; 10,000 at 224x224: 1.5 GB), plus N*H*W for alpha if any image has some.

    Raises FileNotFoundError if ``root`` does not exist, ValueError (naming the
    path) if it is not a directory, has no class folders or no images, has an
    empty class folder or only one class, holds an unreadable image (corrupt, empty, a
    dangling symbolic link, permission denied; unless ``skip_bad``: it is then listed
    in ``ImageSet.skipped``), or holds images of different sizes without ``resize``.
    """
    size = _check_resize(resize)
    root = Path(root)
    classes, rels, rel_labels, ignored = list_image_folder(root, order)
    n = len(rels)

    images = None  # [N, 3, H, W] uint8, allocated once the first image gives H and W
    alpha = None  # [N, H, W] uint8, allocated at the first image with an alpha channel
    labels, paths, skipped, frames = [], [], [], []
    first = None  # (path, (H, W)) of the first image, named in size errors
    with _progress(n, "reading images", "img", enabled=progress) as bar:
        for label, rel in zip(rel_labels, rels):
            bar.update(1)
            try:
                d = _decode(root / rel, size)
            except MemoryError:
                raise
            except Exception as e:  # any decoder failure means "unreadable file"
                if not skip_bad:
                    raise ValueError(f"cannot read image {display_path(root / rel)}: {_decode_error(e)} "
                                     "(pass skip_bad=True / --skip-bad to skip unreadable files)") from e
                skipped.append({"path": rel, "reason": _decode_error(e)})
                continue
            arr = d.rgb
            hw = arr.shape[:2]
            if images is None:
                first = (rel, hw)
                images = torch.empty((n, 3, *hw), dtype=torch.uint8)
            elif hw != first[1]:
                raise ValueError(
                    f"images of different sizes in {display_path(root)}: {display_path(first[0])} is "
                    f"{first[1][0]}x{first[1][1]} but {display_path(rel)} is {hw[0]}x{hw[1]} (HxW); "
                    "pass resize=(H, W) (--resize) to resize all")
            i = len(paths)
            images[i] = torch.from_numpy(arr).permute(2, 0, 1)
            if d.alpha is not None:
                if alpha is None:
                    alpha = torch.full((n, *hw), 255, dtype=torch.uint8)
                alpha[i] = torch.from_numpy(d.alpha)
            note = _frames_note(rel, d)
            if note is not None:
                frames.append(note)
            labels.append(label)
            paths.append(rel)
    if images is None:
        raise ValueError(f"no readable images in {display_path(root)}: all {n} files failed to decode "
                         f"(first: {display_path(skipped[0]['path'])}: {skipped[0]['reason']})")
    if skipped and order is not None:
        raise ValueError(f"{len(skipped)} image(s) of {display_path(root)} could not be read (first: "
                         f"{display_path(skipped[0]['path'])}: {skipped[0]['reason']}); with an order file every "
                         "index must hold its image, so none can be skipped: fix or replace them")
    if skipped:
        kept = set(labels)
        gone = [c for i, c in enumerate(classes) if i not in kept]
        if gone:
            raise ValueError(f"no readable images left in class folder(s) {', '.join(map(display_path, gone))} "
                             f"of {display_path(root)}")
        images = images[: len(paths)]
        if alpha is not None:
            alpha = alpha[: len(paths)]
    ignored = sorted(ignored + frames, key=lambda d: d["path"])
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), classes, paths, skipped,
                    origin=folder_origin(root, order), ignored=ignored, alpha=alpha)


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


def _fold(p: str) -> str:
    """The key under which a case-insensitive (and normalisation-insensitive, as macOS's)
    file system sees ``p``."""
    try:
        return unicodedata.normalize("NFC", p).casefold()
    except UnicodeError:  # pragma: no cover - normalize accepts any str
        return p.casefold()


def case_insensitive(folder) -> bool:
    """Whether the file system of ``folder`` (an existing folder) treats names differing in
    case as one (macOS and Windows by default): probed with a hidden temporary file."""
    folder = Path(folder)
    probe = folder / f".ue_fast_case_{uuid.uuid4().hex[:12]}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False  # cannot tell (read-only, ...): writing would fail anyway
    os.close(fd)
    try:
        return os.path.exists(folder / probe.name.upper())
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def output_paths(paths: list[str], out_root=None) -> list[str]:
    """The relative PNG paths :func:`write_image_folder` writes for ``paths``.

    Raises ValueError for an absolute path, one with "..", or two inputs that map to
    the same output (e.g. "cat/a.jpg" and "cat/a.png"). With ``out_root`` (an existing
    folder) on a case-insensitive file system (macOS, Windows), outputs that differ only
    in case (or in Unicode normalisation), e.g. "cat/A.png" and "cat/a.png", are refused
    too: one would silently replace the other.
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
    if out_root is not None and Path(out_root).is_dir() and case_insensitive(out_root):
        folded: dict[str, str] = {}
        for o, p in zip(out, paths):
            k = _fold(o)
            if k in folded and folded[k] != p:
                raise ValueError(f"{folded[k]!r} and {p!r} would be written to the same file in "
                                 f"{display_path(out_root)}, whose file system ignores case in names "
                                 f"({k!r}): rename one, or write to a case-sensitive file system")
            folded[k] = p
    return out


def _alpha_rows(alpha, n: int, hw) -> np.ndarray | None:
    if alpha is None:
        return None
    if isinstance(alpha, np.ndarray):
        alpha = torch.from_numpy(np.require(alpha, requirements=["C", "W"]))  # copies a read-only map
    if not isinstance(alpha, torch.Tensor) or alpha.dtype != torch.uint8 or tuple(alpha.shape) != (n, *hw):
        desc = f"{alpha.dtype} {tuple(alpha.shape)}" if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must be None or a uint8 tensor [N, H, W] = {[n, *hw]}, got {desc}")
    return alpha.cpu().numpy()


def write_image_folder(out_root, images: torch.Tensor, paths: list[str], *, alpha=None,
                       progress: bool = False) -> list[str]:
    """Write images [N, 3, H, W] uint8 as PNG files at ``out_root/<paths[i]>``.

    The extension becomes ".png": PNG is lossless, while a JPEG would wash out an
    8-bit perturbation. ``alpha``: None, or [N, H, W] uint8 (``ImageSet.alpha``): an image
    whose alpha is not all 255 is written as an RGBA PNG with that alpha, the others as
    RGB. Sub-folders are created; names keep their bytes (a name that is not valid UTF-8
    included). Each file is written to a hidden temporary name and renamed, so an
    interrupted run leaves no truncated PNG (no fsync per file: that would cost more than
    the encoding). Collisions are checked before anything is written (see
    :func:`output_paths`; on a case-insensitive file system, names differing only in case
    collide). Returns the written relative paths.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor [N, 3, H, W], got {desc}")
    paths = list(paths)
    if len(paths) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(paths)} paths")
    a = _alpha_rows(alpha, images.shape[0], tuple(images.shape[2:]))
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise ValueError(f"output folder is not a directory: {display_path(out_root)}")
    outs = output_paths(paths)  # exact collisions, before anything is created
    created = not out_root.exists()
    out_root.mkdir(parents=True, exist_ok=True)
    try:
        output_paths(paths, out_root)  # on a case-insensitive file system, case-only collisions too
    except ValueError:
        if created:
            out_root.rmdir()
        raise
    images = images.cpu()
    for d in sorted({str(PurePosixPath(o).parent) for o in outs}):
        (out_root / d).mkdir(parents=True, exist_ok=True)
    with _progress(len(outs), "writing images", "img", enabled=progress) as bar:
        for i, o in enumerate(outs):
            bar.update(1)
            dest = out_root / o
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
            px = images[i].permute(1, 2, 0).numpy()
            if a is not None and int(a[i].min()) < 255:
                px = np.concatenate([px, a[i][:, :, None]], axis=2)  # [H, W, 4]: an RGBA PNG
            try:
                Image.fromarray(np.ascontiguousarray(px)).save(tmp, format="PNG")
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
