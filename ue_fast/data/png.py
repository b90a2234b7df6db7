"""Writing images as PNG: the protected copy's files, named after their inputs (any
extension becomes ``.png``), never two inputs to one file, on any file system."""
from __future__ import annotations

import io
import os
import unicodedata
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from ..progress import progress as _progress
from .decode import display_path

# zlib level of the PNGs written. Measured on perturbed CIFAR-10 images, 32 px and upscaled
# to 224 px (benchmarks/bench_io.py --levels; results/io-cpu-2026-12-07.md): level 1 encodes 1.3-1.4x
# faster than Pillow's default 6 for files up to 10% larger; 0 is 2x faster again but 46% larger.
PNG_LEVEL = 1


def check_png_level(level) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"the PNG compression level must be an integer 0-9, got {level!r}")
    return level


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


def write_png(dest: Path, image: torch.Tensor, alpha=None, compress_level: int = PNG_LEVEL) -> None:
    """One uint8 [3, H, W] image (with ``alpha``, a uint8 [H, W] array or None: RGBA where it
    is not all 255) as the PNG ``dest``, through a hidden temporary name renamed when
    complete (no fsync: that would cost more than the encoding)."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    px = image.permute(1, 2, 0).numpy()
    if alpha is not None and int(alpha.min()) < 255:
        px = np.concatenate([px, alpha[:, :, None]], axis=2)  # [H, W, 4]: an RGBA PNG
    try:
        Image.fromarray(np.ascontiguousarray(px)).save(tmp, format="PNG", compress_level=compress_level)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_image_folder(out_root, images: torch.Tensor, paths: list[str], *, alpha=None,
                       progress: bool = False, compress_level: int = PNG_LEVEL, workers: int = 1) -> list[str]:
    """Write images [N, 3, H, W] uint8 as PNG files at ``out_root/<paths[i]>``.

    The extension becomes ".png": PNG is lossless, while a JPEG would wash out an
    8-bit perturbation. ``alpha``: None, or [N, H, W] uint8 (``ImageSet.alpha``): an image
    whose alpha is not all 255 is written as an RGBA PNG with that alpha, the others as
    RGB. Sub-folders are created; names keep their bytes (a name that is not valid UTF-8
    included). Each file is written to a hidden temporary name and renamed, so an
    interrupted run leaves no truncated PNG (no fsync per file: that would cost more than
    the encoding). Collisions are checked before anything is written (see
    :func:`output_paths`; on a case-insensitive file system, names differing only in case
    collide). ``compress_level``: zlib's 0-9 (the pixels are the same at every level; see
    ``PNG_LEVEL``); ``workers``: threads encoding at once (Pillow's encoder releases the GIL).
    Returns the written relative paths.
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
    check_png_level(compress_level)

    def write(i: int) -> None:
        write_png(out_root / outs[i], images[i], None if a is None else a[i], compress_level)

    with _progress(len(outs), "writing images", "img", enabled=progress) as bar:
        if workers <= 1 or len(outs) < 2:
            for i in range(len(outs)):
                write(i)
                bar.update(1)
        else:
            with ThreadPoolExecutor(min(workers, len(outs))) as pool:
                for _ in pool.map(write, range(len(outs))):
                    bar.update(1)
    return outs


def encode_pngs(images: torch.Tensor, compress_level: int = PNG_LEVEL, workers: int = 1) -> list[bytes]:
    """uint8 [N, 3, H, W] -> N PNG files' bytes, ``workers`` threads encoding at once."""
    check_png_level(compress_level)

    def one(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(images[i].permute(1, 2, 0).numpy())).save(
            buf, format="PNG", compress_level=compress_level)
        return buf.getvalue()

    if workers <= 1 or len(images) < 2:
        return [one(i) for i in range(len(images))]
    with ThreadPoolExecutor(min(workers, len(images))) as pool:
        return list(pool.map(one, range(len(images))))
