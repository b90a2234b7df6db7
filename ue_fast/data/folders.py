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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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


from .png import (  # noqa: E402,F401 (where they were; the PNG writing lives in png.py)
    PNG_LEVEL,
    case_insensitive,
    check_png_level,
    output_paths,
    write_image_folder,
)


def demo_dir() -> Path:
    """The demo subset shipped in the package: ``demo/train/<class>/*.jpg`` and
    ``demo/test/<class>/*.jpg`` (CIFAR-10 images, see demo/README.md)."""
    d = Path(__file__).resolve().parent / "demo"
    if not (d / "train").is_dir():
        raise FileNotFoundError(f"the demo subset is missing from this installation: {d}")
    return d
