"""List an image folder (``root/<class>/<files>``): its classes, its images in the data
set's order, and every file or folder that is not read, with why.

Nothing under the root is dropped silently: every file or folder that is not read as an
image (a hidden file or folder, a file lying in the root rather than in a class folder,
a file of another type, a folder that cannot be listed) is listed in
``ImageSet.ignored`` with its reason; :func:`describe_left_out` sums it up in a line.

Symbolic links are followed (class folders, sub-folders and files, as torchvision's
``ImageFolder`` does); a link back to a folder above it (a loop) is not followed and is
listed in ``ignored``.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from .decode import (
    _NO_DECODER,
    _decode_error,
    _ext,
    _is_hidden,
    _is_image,
    display_path,
)

# ----------------------------------------------------------------------------- scanning

# The kinds of ``ImageSet.ignored`` entries.
IGNORED_KINDS = ("hidden file", "hidden folder", "in the root", "not an image", "no decoder",
                 "unreadable folder", "link loop", "frames")


def _ignored(rel: str, kind: str, reason: str) -> dict:
    return {"path": rel, "reason": reason, "kind": kind}


def _not_image(rel: str, name: str) -> dict:
    ext = _ext(name)
    if ext in _NO_DECODER:
        return _ignored(rel, "no decoder", f"not an image Pillow can read ({ext}: {_NO_DECODER[ext]})")
    return _ignored(rel, "not an image", f"not an image Pillow can open ({ext or 'no extension'})")


def _entry_is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()  # follows symbolic links
    except OSError:
        return False


def _dir_key(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _walk_class(root: Path, cls: str, ignored: list[dict]) -> list[str]:
    """The image files under ``root/cls`` (relative POSIX paths, unsorted); what is not read is
    appended to ``ignored``. Follows symbolic links to folders, except one back to a folder
    above it (a loop)."""
    found = []
    top = os.path.join(root, cls)
    stack = [(top, cls, frozenset(k for k in (_dir_key(root), _dir_key(top)) if k is not None))]
    while stack:
        path, rel, chain = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            ignored.append(_ignored(rel, "unreadable folder", f"folder cannot be read ({_decode_error(e)})"))
            continue
        for e in entries:
            r = f"{rel}/{e.name}"
            is_dir = _entry_is_dir(e)
            if _is_hidden(e.name):  # e.g. .DS_Store, .ipynb_checkpoints
                ignored.append(_ignored(r, "hidden folder", "hidden folder (not read)") if is_dir
                               else _ignored(r, "hidden file", "hidden file"))
            elif is_dir:
                key = _dir_key(e.path)
                if key is not None and key in chain:
                    ignored.append(_ignored(r, "link loop", "a symbolic link to a folder above it (a loop): "
                                                            "not followed"))
                else:
                    stack.append((e.path, r, chain | {key} if key is not None else chain))
            elif _is_image(e.name):
                found.append(r)  # even if unreadable (a dangling link, a FIFO): decoding names it
            else:
                ignored.append(_not_image(r, e.name))
    return found


def _scan(root: Path) -> tuple[list[str], list[list[str]], list[dict]]:
    """-> (sorted class names, per class the sorted POSIX paths relative to root, what was
    not read: ``ImageSet.ignored`` entries sorted by path)."""
    ignored: list[dict] = []
    classes = []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        is_dir = _entry_is_dir(e)
        if _is_hidden(e.name):
            ignored.append(_ignored(e.name, "hidden folder", "hidden folder (not read)") if is_dir
                           else _ignored(e.name, "hidden file", "hidden file"))
        elif is_dir:
            classes.append(e.name)
        else:
            ignored.append(_ignored(e.name, "in the root", "not in a class folder (lies in the root)"))
    files = [sorted(_walk_class(root, c, ignored)) for c in classes]
    ignored.sort(key=lambda d: d["path"])
    return classes, files, ignored


class FolderScan(NamedTuple):
    classes: list[str]
    files: list[list[str]]  # per class, its images' relative paths, sorted
    ignored: list[dict]  # ImageSet.ignored entries


def scan_folder(root) -> FolderScan:
    """:func:`scan_image_folder` with what was not read: (classes, files per class,
    ``ignored`` entries)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {display_path(root)}")
    if not root.is_dir():
        raise ValueError(f"image folder is not a directory: {display_path(root)}")
    classes, files, ignored = _scan(root)
    n = sum(len(f) for f in files)
    if n == 0:
        loose = [d for d in ignored if d["kind"] == "in the root" and _is_image(d["path"])]
        hint = (f" ({len(loose)} images lie directly in it: put each class in its own sub-folder,"
                " root/<class>/<image>)") if loose else " (expected root/<class>/<image>)"
        raise ValueError(f"empty folder: no images in class sub-folders of {display_path(root)}{hint}")
    empty = [c for c, f in zip(classes, files) if not f]
    if empty:
        notes = []
        for c in empty:
            inside = [d for d in ignored if d["path"].startswith(c + "/") or d["path"] == c]
            if inside:
                notes.append(f"{c!r}: {len(inside)} entries not read, e.g. {display_path(inside[0]['path'])}: "
                             f"{inside[0]['reason']}")
        raise ValueError(f"class folder(s) without images in {display_path(root)}: "
                         f"{', '.join(display_path(c) for c in empty)}; remove them or add images"
                         + (f" ({'; '.join(notes)})" if notes else ""))
    if len(classes) < 2:
        raise ValueError(f"{display_path(root)} needs at least 2 classes (class sub-folders), found 1: {classes[0]!r}")
    return FolderScan(classes, files, ignored)


def scan_image_folder(root) -> tuple[list[str], list[list[str]]]:
    """The classes of ``root`` and, per class, its images' relative paths (the order of
    :func:`read_image_folder`), checked as it documents (missing folder, no classes or
    images, an empty class, a single class). :func:`scan_folder` also returns what was
    not read."""
    s = scan_folder(root)
    return s.classes, s.files


def read_order(order) -> list[str]:
    """The paths of an order file (one POSIX path relative to the folder per line; blank
    lines ignored), or of a list given directly.

    The file is read as bytes and decoded as the file system decodes names (UTF-8, with
    bytes that are not valid UTF-8 kept as surrogate escapes, as ``os.listdir`` gives
    them), so an order file written by ``find`` or ``ls`` names any file; a UTF-8 byte
    order mark is dropped.
    """
    if isinstance(order, (list, tuple)):
        return [os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in order]
    path = Path(order)
    if not path.is_file():
        raise FileNotFoundError(f"order file not found: {display_path(path)}")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return [os.fsdecode(line.strip()) for line in data.splitlines() if line.strip()]


class FolderListing(NamedTuple):
    classes: list[str]
    paths: list[str]
    labels: list[int]
    ignored: list[dict]


def list_image_folder(root, order=None) -> FolderListing:
    """:func:`ordered_listing` with what was not read: (classes, paths, labels, ``ignored``)."""
    classes, files, ignored = scan_folder(root)
    rels = [r for f in files for r in f]
    label_of = {r: i for i, f in enumerate(files) for r in f}
    if order is None:
        return FolderListing(classes, rels, [label_of[r] for r in rels], ignored)
    shown = display_path(root)
    paths = read_order(order)
    unknown = [p for p in paths if p not in label_of]
    if unknown:
        raise ValueError(f"{len(unknown)} path(s) of the order are not images of {shown} (e.g. {unknown[0]!r}); "
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
        raise ValueError(f"the order lists {len(paths)} of the {len(rels)} images of {shown}; it must list every "
                         f"one (e.g. missing {missing[0]!r})")
    return FolderListing(classes, paths, [label_of[p] for p in paths], ignored)


def ordered_listing(root, order=None) -> tuple[list[str], list[str], list[int]]:
    """(classes, relative paths, labels) of the image folder ``root`` in the data set's order.

    Without ``order``: classes sorted, then paths sorted within each (what
    :func:`scan_image_folder` lists). With ``order`` (a file or a list of relative paths,
    see :func:`read_order`): exactly those paths in that order, which must name every image
    of the folder once; labels still come from the class folders. :func:`list_image_folder`
    also returns what was not read.
    """
    classes, paths, labels, _ = list_image_folder(root, order)
    return classes, paths, labels


def describe_left_out(ignored, skipped=(), where: str = "manifest.json") -> str | None:
    """One line summing up what of an input was not protected, or None when everything was.

    ``ignored``/``skipped``: ``ImageSet.ignored`` and ``ImageSet.skipped``. E.g. "3 files not
    protected: 2 hidden files, 1 not in a class folder (lies in the root) (see manifest.json
    'ignored')". Multi-frame images (read, but only their first frame) are counted apart.
    """
    ignored, skipped = list(ignored or ()), list(skipped or ())
    frames = [d for d in ignored if d.get("kind") == "frames"]
    left = [d for d in ignored if d.get("kind") != "frames"]
    if not (left or skipped or frames):
        return None

    def n(k: int, one: str, many: str) -> str:
        return f"{k} {one if k == 1 else many}"

    def exts(ds) -> str:
        found = sorted({_ext(d["path"].rsplit("/", 1)[-1]) or "no extension" for d in ds})
        return ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")

    by = Counter(d.get("kind") for d in left)
    groups = {k: [d for d in left if d.get("kind") == k] for k in by}
    parts = []
    for kind, text in (("hidden file", lambda k, ds: n(k, "hidden file", "hidden files")),
                       ("hidden folder", lambda k, ds: n(k, "hidden folder", "hidden folders")),
                       ("in the root", lambda k, ds: f"{k} not in a class folder (lying in the root)"),
                       ("not an image", lambda k, ds: f"{k} not {'an image' if k == 1 else 'images'} Pillow can "
                                                      f"open ({exts(ds)})"),
                       ("no decoder", lambda k, ds: f"{k} in a format Pillow cannot decode ({exts(ds)})"),
                       ("unreadable folder", lambda k, ds: n(k, "folder that cannot be read",
                                                             "folders that cannot be read")),
                       ("link loop", lambda k, ds: n(k, "folder link looping back (not followed)",
                                                     "folder links looping back (not followed)"))):
        if kind in by:
            parts.append(text(by.pop(kind), groups[kind]))
    for kind, k in by.items():  # kinds from elsewhere
        parts.append(f"{k} {kind}")
    if skipped:
        parts.append(n(len(skipped), "unreadable image skipped (--skip-bad)", "unreadable images skipped (--skip-bad)"))
    out = []
    total = len(left) + len(skipped)
    if total:
        folders = any(d.get("kind") in ("hidden folder", "unreadable folder", "link loop") for d in left)
        what = "files and folders" if folders else ("file" if total == 1 else "files")
        out.append(f"{total} {what} not protected: {', '.join(parts)}")
    if frames:
        out.append(n(len(frames), "multi-frame image: only its first frame protected",
                     "multi-frame images: only their first frame protected"))
    keys = [k for k, has in (("ignored", left or frames), ("skipped", skipped)) if has]
    return "; ".join(out) + f" (see {where} {' and '.join(repr(k) for k in keys)})"
