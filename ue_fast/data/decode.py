"""Decode one image file with Pillow into uint8 RGB (and its alpha, kept apart); the
formats read, and how names are shown.

File names: paths are ``str`` as ``os.listdir`` gives them: a file name that is not valid
UTF-8 keeps its bytes as lone surrogates (``"cat/\\udcff.png"`` for the byte ``0xff``), is
read and written under its own name, and round-trips through
:func:`~ue_fast.data.exports.write_json_atomic` (which writes such a character as the JSON
escape ``\\udcff``). Messages show it as ``cat/\\xff.png`` (:func:`display_path`).

What is read:

- Every format Pillow can open and decode (:data:`IMAGE_EXTENSIONS`, derived from
  Pillow's registry when this module is imported): JPEG, PNG, BMP, WebP, TIFF, GIF,
  PPM/PGM/PBM, ... A multi-frame file (an animated GIF or WebP, a multi-page TIFF) is
  read as its first frame and listed in ``ImageSet.ignored`` with the number of frames.
- Colours: RGB as decoded; grayscale is replicated; palette images through their
  palette; 16-bit images scaled to 8 bits; CMYK by Pillow's plain conversion (no ICC
  colour management); the EXIF orientation is applied.
- Transparency (RGBA, LA, PA, a palette or grayscale/RGB image with a transparent
  colour): the colour channels are read as they are, as Pillow's ``convert("RGB")``
  of an RGBA image (and torchvision's default loader) reads them: alpha is *not*
  composited onto any background. The alpha channel is kept apart, unchanged, in
  ``ImageSet.alpha`` ([N, H, W] uint8, 255 where an image has none; None when no
  image of the set is transparent anywhere), and
  :func:`~ue_fast.data.folders.write_image_folder` writes it back: a protected copy of
  an RGBA PNG is an RGBA PNG with the same alpha. Perturbations apply to the colour
  channels only.
- An image that cannot be decoded (corrupt, empty, a dangling symbolic link, permission
  denied, a FIFO) is an error naming it, or with ``skip_bad`` is listed in
  ``ImageSet.skipped``.
- Huge images: Pillow's decompression-bomb guard stays in force (``PIL.Image.MAX_IMAGE_PIXELS``,
  about 89 megapixels, warns; twice that is refused as an unreadable image, named in the
  error). Raise ``PIL.Image.MAX_IMAGE_PIXELS`` (or set it to None) before reading if
  your images are that large and come from a trusted source.
"""
from __future__ import annotations

import numbers
import os
import stat
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps


def _pillow_formats() -> tuple[tuple[str, ...], dict[str, str]]:
    """(the extensions of the formats Pillow can open and decode, sorted; {extension: why
    Pillow cannot read files of it} for formats it only identifies)."""
    Image.init()  # registers every plugin bundled with Pillow
    ok, cannot = set(), {}
    for ext, fmt in Image.registered_extensions().items():
        ext = ext.lower()
        # MPO (multi-picture JPEG, from cameras) is opened by the JPEG plugin's factory.
        opener = Image.OPEN.get(fmt) or (Image.OPEN.get("JPEG") if fmt == "MPO" else None)
        if opener is None:
            continue  # a format Pillow only writes (PDF, ...)
        factory = opener[0]
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            cannot[ext] = f"Pillow identifies {fmt} files but has no decoder for them"
        elif fmt == "MPEG":
            cannot[ext] = "Pillow identifies MPEG video files but cannot decode them"
        elif fmt == "EPS" and not _has_ghostscript():
            cannot[ext] = "Pillow reads EPS/PostScript only with Ghostscript, which is not installed"
        else:
            ok.add(ext)
    return tuple(sorted(ok)), cannot


def _has_ghostscript() -> bool:
    try:
        from PIL import EpsImagePlugin

        return bool(EpsImagePlugin.has_ghostscript())
    except Exception:
        return False


# The file extensions read as images (lower case; matched in any case): those of every
# format Pillow can open and decode, taken from its registry (Image.registered_extensions
# restricted to Image.OPEN), so a Pillow with more plugins reads more formats.
IMAGE_EXTENSIONS, _NO_DECODER = _pillow_formats()
_IMAGE_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)

# Pillow's resampling filters are antialiased when they downscale (the kernel
# widens with the scale factor), so BICUBIC is a sound default both ways.
RESIZE_FILTER = Image.Resampling.BICUBIC

# Formats whose extra "frames" are not further images of the file: MPO's are previews or
# the other view of a stereo pair, PSD's are the layers of the composite read.
_FRAMES_NOT_IMAGES = frozenset({"MPO", "PSD"})



# ----------------------------------------------------------------------------- names


def display_path(p) -> str:
    """``p`` (a str, bytes or path) printable in any encoding context: bytes of a file name
    that are not valid UTF-8 (lone surrogates in a ``str``) shown as ``\\xff``."""
    s = os.fspath(p)
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (e.g. read from JSON)
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _decode_error(e: BaseException) -> str:
    return display_path(f"{type(e).__name__}: {e}")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and _ext(name) in _IMAGE_EXTENSIONS


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


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _wide_gray(im: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer or float grayscale -> [H, W] uint8.

    "I;16*" and a PPM/PGM's "I" (Pillow scales its maxval to 65535) are 16-bit: / 257.
    Other "I" images (32-bit, e.g. a TIFF) hold no bit depth Pillow reports: values up to
    255 are read as 8-bit, up to 65535 as 16-bit; others are refused. Float ("F") images
    must lie in [0, 1] (scaled by 255): any other range is ambiguous and refused.
    """
    mode = im.mode
    a = np.asarray(im)
    if mode == "F":
        a = a.astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"a floating-point image with values in [{lo:g}, {hi:g}]: only [0, 1] is read "
                             "(convert it to an 8- or 16-bit image)")
        a = a * 255.0
    else:
        a = a.astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"a {mode} image with values in [{lo:g}, {hi:g}]: beyond 16 bits, its scale is unknown "
                             "(convert it to an 8- or 16-bit image)")
        if mode.startswith("I;16") or im.format == "PPM" or hi > 255:
            a = a / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _split_alpha(im: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """Any Pillow mode -> (the RGB image, its alpha [H, W] uint8 or None if fully opaque).

    The colour channels are taken as they are (alpha is not composited: Pillow's
    ``convert("RGB")`` of an RGBA image); a palette, grayscale or RGB image with a
    transparent colour gets the alpha Pillow's ``convert("RGBA")`` gives it. 16-bit,
    32-bit and float grayscale: see :func:`_wide_gray`. CMYK uses Pillow's plain
    conversion (no ICC colour management).
    """
    mode, alpha = im.mode, None
    if mode == "RGB" and "transparency" not in im.info:
        return im, None
    if mode.startswith("I") or mode == "F":
        g = _wide_gray(im)
        t = im.info.get("transparency")
        if isinstance(t, int) and mode != "F":
            alpha = np.where(np.asarray(im) == t, 0, 255).astype(np.uint8)
        rgb = Image.fromarray(g).convert("RGB")
    elif mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")  # also applies a palette's or a colour key's transparency
        alpha = np.array(rgba.getchannel("A"))
        rgb = rgba.convert("RGB")  # drops alpha: the colours as stored
    else:
        rgb = im.convert("RGB")
    if alpha is not None and (alpha.size == 0 or int(alpha.min()) == 255):
        alpha = None
    return rgb, alpha


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, the colour channels as they are (alpha dropped, not composited;
    see :func:`_split_alpha`, which also returns it)."""
    return _split_alpha(im)[0]


class Decoded(NamedTuple):
    rgb: np.ndarray  # [H, W, 3] uint8
    alpha: np.ndarray | None  # [H, W] uint8, None when fully opaque
    frames: int  # frames in the file (1 for a still image); only the first is read
    format: str | None  # Pillow's format name, e.g. "GIF"


def _check_file(path) -> None:
    """Refuse what is not a regular file before Pillow opens it (a FIFO would block), and say
    what a dangling symbolic link points to."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"a symbolic link to {os.readlink(path)!r}, which does not exist "
                                    "(a dangling link)") from None
        raise
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError("a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
        raise ValueError(f"{kind}, not a regular file")


def _decode(src, size: tuple[int, int] | None) -> Decoded:
    """Decode ``src`` (a path or a binary file), resized to ``size`` = (H, W) if given (the
    alpha channel with the same filter). The EXIF orientation is applied, so the pixels
    match what an image viewer shows. A multi-frame file gives its first frame."""
    if isinstance(src, (str, bytes, os.PathLike)):
        _check_file(src)
    with Image.open(src) as im:
        try:
            frames = int(getattr(im, "n_frames", 1) or 1)
        except Exception:  # a broken later frame does not make the first unreadable
            frames = 1
        if im.format in _FRAMES_NOT_IMAGES:
            frames = 1
        fmt = im.format
        if size is not None and im.format in ("JPEG", "MPO"):  # MPO: a camera's multi-picture JPEG
            # Let the JPEG decoder downscale by 2/4/8 first (stays >= 2x the target,
            # then the filter finishes): large photos decode many times faster.
            s = 2 * max(size)
            im.draft(None, (s, s))
        im.load()
        if im.width == 0 or im.height == 0:
            raise ValueError(f"an empty image ({im.width}x{im.height} pixels)")
        try:
            orientation = im.getexif().get(0x0112, 1)  # 0x0112: EXIF orientation
        except Exception:  # a broken EXIF block does not make the pixels unreadable
            orientation = 1
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        rgb, alpha = _split_alpha(im)
        if size is not None and rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), RESIZE_FILTER)
            if alpha is not None:
                alpha = np.array(Image.fromarray(alpha).resize((size[1], size[0]), RESIZE_FILTER), dtype=np.uint8)
                if int(alpha.min()) == 255:
                    alpha = None
        # np.array: a writable copy (torch warns on read-only arrays)
        return Decoded(np.array(rgb, dtype=np.uint8), alpha, frames, fmt)


def _load_rgb(src, size: tuple[int, int] | None) -> np.ndarray:
    """Decode ``src`` (a path or a binary file) -> [H, W, 3] uint8, resized to ``size`` = (H, W).

    The colour channels as stored (an alpha channel is dropped: :func:`_decode` returns it).
    The EXIF orientation is applied, so the pixels match what an image viewer shows.
    """
    return _decode(src, size).rgb


def _frames_note(rel: str, d: Decoded) -> dict | None:
    """The ``ignored`` entry of a multi-frame file (only its first frame is read), or None."""
    if d.frames <= 1:
        return None
    return {"path": rel, "reason": f"only the first of its {d.frames} frames is protected ({d.format} "
                                   "with several frames)", "kind": "frames", "frames": d.frames}
