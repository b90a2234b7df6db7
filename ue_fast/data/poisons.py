"""Other tools' poisons in: a protected training set rebuilt against its clean base set.

``evaluate`` trains victims on what ``protect`` writes, and on what other unlearnable-example
code writes, on the same footing. :func:`load_poisoned` reads:

- a ``protect`` output folder (its PNG tree; ``manifest.json`` present);
- an APBench poison folder, ``<type>_poisons/<dataset>/data/<index>.png`` (the ``data``
  folder or the ``<dataset>`` folder above it): image ``i`` takes the label of the clean
  base set's image ``i``, as APBench's loader does;
- a perturbation tensor, ``.pt`` (read with ``torch.load(weights_only=True)``, never
  unpickling code) or ``.npy`` (``allow_pickle=False``):

  * float, sample-wise ``[N, 3, H, W]`` or class-wise ``[C, 3, H, W]``, in [-eps, eps] as
    fractions of the pixel range (the ``poison.pt`` of the MI-UE and EM code, and ours);
  * int8/int16 ``[N, 3, H, W]``, in units of 1/255 (``perturbation_int8.npy``);
  * uint8 ``[N, 3, H, W]`` or ``[N, H, W, 3]``: the protected images themselves.

  A perturbation is applied as the MI-UE authors' evaluation applies it
  (``datasets/cifar.py``: ``clip(x + 255 delta, 0, 255)`` then ``astype(uint8)``, i.e.
  truncation), except that a value within 1e-3 of the grey level above counts as that
  level: float32 cannot hold k/255 exactly, and ``255 * float32(k/255)`` may fall just
  under k, which plain truncation would turn into k - 1.

  The first dimension decides the layout: the base set's size means sample-wise (row i for
  image i), the number of classes means class-wise (row c for every image of class c);
  anything else is an error naming both sizes.

The clean base set is a data set in its own order (``ue_fast.data.canonical``: CIFAR
batches, an SVHN ``.mat``, a ``.npz``) or an image folder with an order file.

What :func:`load_poisoned` records in ``origin`` tells whether the base set is the one the
poisons were made against (``ue_fast.evaluate.pairs`` decides from it): ``linf_255``, the
largest |protected - base| (for a perturbation tensor it is bounded by the tensor's own values
whatever the base set, so it proves nothing there); and for a perturbation tensor
``clipped_pixels``, the pixels where base + perturbation left [0, 255] and were clipped, beside
``clipped_pixels_shifted``, the same count with each perturbation set on the next base image (what
an unrelated base set gives). A generator that clamps its perturbation to the pixel range of
the images it was made on (PGD-based ones, and ``protect``'s ``poison.pt``) clips no pixel of
its own base set. Everything is computed by chunks of images: memory stays bounded whatever N.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .decode import _load_rgb
from .folders import ImageSet

_INDEX_PNG = re.compile(r"^(0|[1-9][0-9]*)\.png$")
TOLERANCE_255 = 1e-3  # a value this close under a grey level counts as that level
CHUNK_ELEMS = 1 << 23  # image elements per chunk when applying perturbations and measuring distances


def apbench_data_dir(path) -> Path | None:
    """The ``data`` folder of an APBench poison folder at ``path`` (``path`` itself, or
    ``path/data``), or None when ``path`` is not one (its files are not all ``<index>.png``)."""
    p = Path(path)
    for d in (p, p / "data"):
        if not d.is_dir():
            continue
        names = [e.name for e in d.iterdir() if not e.name.startswith(".")]
        pngs = [n for n in names if _INDEX_PNG.match(n)]
        if pngs and len(pngs) == len(names):
            return d
    return None


def kind_of(path) -> str:
    """"ue_fast" (a protect output), "apbench" (an APBench poison folder), "tensor" (a
    .pt/.npy file) or "folder" (any other image folder)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".pt", ".pth", ".npy"):
        return "tensor"
    if (p / "manifest.json").is_file():
        return "ue_fast"
    if apbench_data_dir(p) is not None:
        return "apbench"
    return "folder"


def _read_tensor(path: Path) -> torch.Tensor:
    if path.suffix.lower() == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as e:
            raise ValueError(f"cannot read {path}: {e} (only plain arrays are read)") from None
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(t, dict):  # some scripts save {"perturbation": tensor} or similar: take a lone tensor
        tensors = [v for v in t.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError(f"{path} holds a dict with keys {sorted(map(str, t))}: expected one tensor")
        t = tensors[0]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path} holds a {type(t).__name__}, not a tensor")
    return t.detach()


def apply_perturbation(clean: torch.Tensor, delta: torch.Tensor, per_255: bool = False) -> torch.Tensor:
    """uint8 images ``clean`` [N, 3, H, W] plus ``delta`` (same shape; fractions of the pixel
    range, or grey levels with ``per_255``), clipped and truncated to uint8 as the module
    docstring says."""
    v = clean.to(torch.float64) + delta.to(torch.float64) * (1.0 if per_255 else 255.0)
    return torch.floor(v.clamp_(0, 255) + TOLERANCE_255).clamp_(0, 255).to(torch.uint8)


def _from_tensor(path: Path, base: ImageSet) -> tuple[torch.Tensor, dict]:
    t = _read_tensor(path)
    n, c = len(base), base.num_classes
    hw = tuple(base.image_size)
    if t.dim() != 4:
        raise ValueError(f"{path} holds a tensor of shape {tuple(t.shape)}; expected [N, 3, H, W] "
                         f"(N = {n} images of the base set, or C = {c} classes for a class-wise one)")
    if t.dtype == torch.uint8:  # protected images
        if t.shape[1] != 3 and t.shape[-1] == 3:
            t = t.permute(0, 3, 1, 2)
        if tuple(t.shape) != (n, 3, *hw):
            raise ValueError(f"{path} holds uint8 images of shape {tuple(t.shape)} (as [N, 3, H, W]) but the base "
                             f"set has {n} images of {hw[0]}x{hw[1]}: they must match")
        return t.contiguous(), {"layout": "images"}
    if t.dtype in (torch.int8, torch.int16):
        per_255 = True
    elif t.is_floating_point():
        per_255 = False
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path} holds NaN or infinite values")
        top = float(t.abs().max())
        if top > 1.0:
            raise ValueError(f"{path} holds values up to {top:g}: a float perturbation is read as a fraction of "
                             "the pixel range, in [-1, 1] (8/255 = 0.031); scale it, or save protected images as "
                             "uint8")
    else:
        raise ValueError(f"{path} holds a {t.dtype} tensor: expected float (a perturbation), int8/int16 (a "
                         "perturbation in 1/255) or uint8 (protected images)")
    if tuple(t.shape[1:]) != (3, *hw):
        raise ValueError(f"{path} holds perturbations of {tuple(t.shape[1:])} per image but the base set's images "
                         f"are (3, {hw[0]}, {hw[1]})")
    if t.shape[0] == n:
        layout, rows = "sample-wise", (lambda a, b: t[a:b])
    elif t.shape[0] == c:
        layout, rows = "class-wise", (lambda a, b: t[base.labels[a:b]])
    else:
        raise ValueError(f"{path} holds {t.shape[0]} perturbations, but the base set has {n} images and {c} classes: "
                         "a poison tensor must have one row per image (sample-wise) or one per class (class-wise)")
    out = torch.empty_like(base.images)
    clipped = torch.zeros(n, dtype=torch.int64)
    shifted = 0
    for a, b in _chunks(base):
        clean, delta = base.images[a:b], rows(a, b)
        out[a:b] = apply_perturbation(clean, delta, per_255)
        clipped[a:b] = _clipped(clean, delta, per_255)
        if n > 1:  # each perturbation on the next base image: what an unrelated base set gives
            shifted += int(_clipped(base.images[(torch.arange(a, b) + 1) % n], delta, per_255).sum())
    hit = torch.nonzero(clipped)[:, 0]
    return out, {"layout": layout, "clipped_pixels": int(clipped.sum()), "clipped_images": len(hit),
                 "clipped_examples": [base.paths[i] for i in hit[:5].tolist()], "clipped_pixels_shifted": shifted}


def _chunks(base: ImageSet):
    n = len(base)
    step = max(1, CHUNK_ELEMS // max(1, base.images[0].numel() if n else 1))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _clipped(clean: torch.Tensor, delta: torch.Tensor, per_255: bool) -> torch.Tensor:
    """int64 [B]: per image, the pixels where clean + delta leaves [0, 255] by more than the tolerance."""
    v = clean.to(torch.float64) + delta.to(torch.float64) * (1.0 if per_255 else 255.0)
    return ((v < -TOLERANCE_255) | (v > 255 + TOLERANCE_255)).flatten(1).sum(1)


def _from_apbench(data_dir: Path, base: ImageSet) -> torch.Tensor:
    indices = sorted(int(_INDEX_PNG.match(e.name).group(1)) for e in data_dir.iterdir() if _INDEX_PNG.match(e.name))
    n = len(base)
    if indices != list(range(n)):
        have = len(indices)
        raise ValueError(f"{data_dir} holds {have} images numbered {indices[0]}..{indices[-1]}, but the base set has "
                         f"{n} images: an APBench poison folder needs exactly 0.png .. {n - 1}.png")
    out = torch.empty_like(base.images)
    for i in range(n):
        arr = _load_rgb(data_dir / f"{i}.png", None)
        if arr.shape[:2] != tuple(base.image_size):
            raise ValueError(f"{data_dir / f'{i}.png'} is {arr.shape[0]}x{arr.shape[1]} but the base set's images are "
                             f"{base.image_size[0]}x{base.image_size[1]}")
        out[i] = torch.from_numpy(arr).permute(2, 0, 1)
    return out


def load_poisoned(path, base: ImageSet) -> ImageSet:
    """The protected training set that an APBench folder or a poison tensor at ``path`` makes of
    the clean ``base`` set (in the base set's order, with its labels and paths). ``origin``
    records what was read, the layout, the L-inf distance to ``base`` in 1/255 and, for a
    perturbation tensor, the clipped pixels (see the module docstring). Whether ``base`` is the
    set the poisons were made against is checked by ``ue_fast.evaluate.pairs.check_pairs``."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "tensor":
        images, info = _from_tensor(path, base)
    elif kind == "apbench":
        images, info = _from_apbench(apbench_data_dir(path), base), {"layout": "apbench-folder"}
    else:
        raise ValueError(f"{path} is neither an APBench poison folder (<index>.png files) nor a poison tensor "
                         "(.pt or .npy)")
    linf = 0
    for a, b in _chunks(base):  # by chunks: int16 copies of both sets at once would double the memory
        linf = max(linf, int((images[a:b].to(torch.int16) - base.images[a:b].to(torch.int16)).abs().amax()))
    origin = {"format": kind, "path": str(path), **info, "linf_255": linf, "base": base.origin}
    return ImageSet(images, base.labels.clone(), list(base.classes), list(base.paths), origin=origin)
