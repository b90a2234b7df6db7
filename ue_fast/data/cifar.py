"""Class-balanced subsets of an image-folder tarball (``<split>/<class>/<file>``).

Made for ``shared/data/cifar10-jpeg.tar.gz`` (CIFAR-10 as train/ and test/ JPEG
trees): tests and benchmarks read a few thousand real images straight from the
archive, without extracting 60,000 files.
"""
from __future__ import annotations

import functools
import io
import numbers
import os
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .decode import _decode_error, _is_image, _load_rgb
from .folders import ImageSet


@functools.lru_cache(maxsize=4)
def _index(path: str, size: int, mtime_ns: int) -> dict[str, dict[str, list[tarfile.TarInfo]]]:
    # Listing a .tar.gz decompresses all of it (~1.5 s for CIFAR-10): cached per
    # file version, so a test session pays it once.
    out: dict[str, dict[str, list[tarfile.TarInfo]]] = {}
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            parts = PurePosixPath(m.name).parts
            if m.isfile() and len(parts) >= 3 and _is_image(parts[-1]):
                out.setdefault(parts[-3], {}).setdefault(parts[-2], []).append(m)
    for classes in out.values():
        for members in classes.values():
            members.sort(key=lambda m: m.name)
    return out


def tar_index(tarball) -> dict[str, dict[str, list[tarfile.TarInfo]]]:
    """split -> class -> image members sorted by name, for members ``.../<split>/<class>/<file>``."""
    p = Path(tarball)
    if not p.is_file():
        raise FileNotFoundError(f"tarball not found: {p}")
    st = p.stat()
    return _index(str(p.resolve()), st.st_size, st.st_mtime_ns)


def select_members(tarball, split: str, per_class: int | None, *, seed: int | None = None
                   ) -> list[tuple[str, tarfile.TarInfo]]:
    """(class, member) pairs: ``per_class`` per class (None: all), classes sorted.

    Without ``seed``: the first ``per_class`` files of each class in sorted order.
    With ``seed``: a uniform sample per class from one ``torch.Generator`` seeded
    with it (classes drawn in sorted order), then sorted by name.
    """
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral)
                                  or per_class < 1):
        raise ValueError(f"per_class must be a positive int or None, got {per_class!r}")
    index = tar_index(tarball)
    if split not in index:
        raise ValueError(f"split {split!r} not in {tarball}; it holds {sorted(index)}")
    classes = sorted(index[split])
    if len(classes) < 2:
        raise ValueError(f"split {split!r} of {tarball} needs at least 2 classes, found {classes}")
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    out = []
    for c in classes:
        members = index[split][c]
        k = len(members) if per_class is None else int(per_class)
        if k > len(members):
            raise ValueError(f"per_class={per_class} but class {c!r} of split {split!r} has only {len(members)} images")
        if gen is None:
            chosen = members[:k]
        else:
            pick = torch.randperm(len(members), generator=gen)[:k].tolist()
            chosen = sorted((members[i] for i in pick), key=lambda m: m.name)
        out.extend((c, m) for m in chosen)
    return out


def read_members(tarball, members: list[tarfile.TarInfo]) -> list[bytes]:
    """The bytes of ``members`` (from :func:`tar_index`), in the order given."""
    data: dict[int, bytes] = {}
    with tarfile.open(tarball, "r:*") as tf:
        # Offset order: one forward pass through the compressed stream.
        for m in sorted(members, key=lambda m: m.offset_data):
            data[m.offset_data] = tf.extractfile(m).read()
    return [data[m.offset_data] for m in members]


def load_cifar_subset(tarball, split: str, per_class: int | None, *, seed: int | None = None) -> ImageSet:
    """A class-balanced :class:`ImageSet` read from ``tarball`` (no extraction to disk).

    split:     top folder inside the archive ("train" or "test" for CIFAR-10)
    per_class: images per class (None: all); deterministic, see :func:`select_members`
    Returns images [K*C, 3, H, W] uint8, ordered by class then file name; paths are
    relative to the split, e.g. "cat/0001.jpg". Memory: K*C*3*H*W bytes.
    """
    chosen = select_members(tarball, split, per_class, seed=seed)
    blobs = read_members(tarball, [m for _, m in chosen])
    classes = sorted({c for c, _ in chosen})
    arrays = []
    for (c, m), blob in zip(chosen, blobs):
        try:
            arrays.append(_load_rgb(io.BytesIO(blob), None))
        except Exception as e:
            raise ValueError(f"cannot decode {m.name} in {tarball}: {_decode_error(e)}") from e
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(f"images of different sizes in {tarball}: {chosen[0][1].name} is "
                             f"{arrays[0].shape[:2]} but {m.name} is {arrays[-1].shape[:2]} (HxW)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
    label_of = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([label_of[c] for c, _ in chosen], dtype=torch.int64)
    paths = [f"{c}/{os.path.basename(m.name)}" for c, m in chosen]
    return ImageSet(images, labels, classes, paths)
