"""Output folders and files: what a command may write, replace and remove, and one run at a time.

The rules every command keeps (a user's files are never touched):

- It writes only where it was told, never over one of its own inputs, never two outputs
  under one name, never over a file of another kind (a PNG over a JSON), and never inside
  an input data set of the same command (:func:`check_output_file`, :func:`check_output_folder`).
- Replacing an earlier output (``--overwrite``) removes only what ue_fast wrote there, as
  its own record lists it (a protect manifest's ``files`` and ``outputs``, the work folder's
  ``outputs.json`` of an interrupted run, a report's cells, an export's ``index.json``);
  anything else in the folder is named and the command refused before anything is removed
  (:func:`remove_owned`).
- One run holds an output folder at a time (:func:`hold`): a lock taken with ``filelock``
  (an OS lock, released by the kernel when its process dies, so a crashed run never blocks
  a resume), and beside it the holder's pid, host, command and start time, which a refused
  second run names.
- The hidden temporary files an interrupted write leaves (``.<name>.<8 characters>.tmp``,
  ``.<name>.tmp``: every temporary name ue_fast writes) are removed when the folder is
  resumed or replaced (:func:`remove_debris`).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import socket
from pathlib import Path

LOCK_FILE = ".ue_fast.lock"
HOLDER_FILE = ".ue_fast.lock.json"
WORK_DIR = ".ue_fast"
# Every temporary name ue_fast writes: write_image_folder's ".<name>.<8 hex>.tmp", atomic_open's
# mkstemp ".<name>.<8 characters>.tmp", the perturbation .npy's ".<name>.tmp", a report's
# "report.md.tmp".
_DEBRIS = re.compile(r"^\.[^/]+\.tmp$|^report\.md\.tmp$")


class OutputBusyError(ValueError):
    """Another run holds the output folder."""


def _display(p) -> str:
    from .data.decode import display_path

    return display_path(p)


# ----------------------------------------------------------------------------- one run at a time


def _holder(folder: Path) -> str:
    try:
        h = json.loads((folder / HOLDER_FILE).read_text(encoding="utf-8"))
        return (f"pid {h['pid']} on {h['host']}, `{h['command']}` started {h['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is"


def _acquire(folder: Path):
    """The folder's lock, acquired at once, or :class:`OutputBusyError` naming its holder."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputBusyError(f"{_display(folder)} is in use by another ue_fast run ({_holder(folder)}): wait for "
                              "it to finish, or choose another output folder") from None
    return lock


@contextlib.contextmanager
def hold(folder, command: str):
    """Hold ``folder`` (which must exist) for one run of ``command``: refuse with
    :class:`OutputBusyError`, naming the holder, if another live run holds it. The lock and
    holder files are removed when the block ends."""
    folder = Path(folder)
    lock = _acquire(folder)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        (folder / HOLDER_FILE).write_text(json.dumps(info) + "\n", encoding="utf-8")
        yield
    finally:
        for name in (HOLDER_FILE, LOCK_FILE):
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        lock.release()


def check_not_held(folder) -> None:
    """Refuse (:class:`OutputBusyError`, naming the holder) if a live run holds ``folder``
    now; a lock left by a dead process is no obstacle."""
    folder = Path(folder)
    if (folder / LOCK_FILE).exists():
        _acquire(folder).release()


def entries_besides_locks(folder) -> list[str]:
    """The names in ``folder`` other than a lock and its holder's note."""
    return [n for n in os.listdir(folder) if n not in (LOCK_FILE, HOLDER_FILE)]


# ----------------------------------------------------------------------------- what is ours


def is_debris(name: str) -> bool:
    """Whether ``name`` is a temporary file name ue_fast writes (and renames when complete)."""
    return bool(_DEBRIS.match(name))


def _entries(folder: Path):
    """(relative path, is a folder) of everything under ``folder``; symbolic links are not followed."""
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath).relative_to(folder)
        for d in list(dirnames):
            p = Path(dirpath, d)
            if p.is_symlink():  # a link is an entry of its own, never followed
                dirnames.remove(d)
                filenames.append(d)
        for d in dirnames:
            yield (base / d).as_posix(), True
        for f in filenames:
            yield (base / f).as_posix(), False


def foreign_entries(folder, owned_files, owned_dirs=(WORK_DIR,)) -> list[str]:
    """What ``folder`` holds that ue_fast did not write: not one of ``owned_files`` (relative
    POSIX paths), not inside one of ``owned_dirs``, not a folder on the way to an owned file,
    not a lock, holder or temporary file of ours. The shallowest such entries, sorted
    (a foreign folder is named, not its contents)."""
    folder = Path(folder)
    owned = set(owned_files) | {LOCK_FILE, HOLDER_FILE}
    parents = {p for f in owned for p in (Path(f).parents) if str(p) != "."}
    parents = {p.as_posix() for p in parents}
    out = []
    for rel, is_dir in _entries(folder):
        if any(rel == d or rel.startswith(d + "/") for d in owned_dirs):
            continue
        if is_dir and rel in parents:
            continue
        if not is_dir and (rel in owned or (is_debris(rel.rsplit("/", 1)[-1]) and str(Path(rel).parent) in
                                              ({"."} | parents))):
            continue
        if any(rel.startswith(f.rstrip("/") + "/") for f in out):
            continue  # inside a foreign folder already named
        out.append(rel + ("/" if is_dir else ""))
    return sorted(out)


def _named(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(_display(e) for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def remove_owned(folder, owned_files, what: str, owned_dirs=(WORK_DIR,)) -> None:
    """Remove from ``folder`` exactly what ue_fast wrote there (:func:`remove_listed`), after
    refusing (ValueError, naming them) if the folder holds anything else: nothing is removed
    then. ``what`` names the earlier output in messages."""
    folder = Path(folder)
    foreign = foreign_entries(folder, owned_files, owned_dirs)
    if foreign:
        raise ValueError(f"refusing to replace {_display(folder)}: besides {what} it holds {_named(foreign)}, "
                         "which ue_fast did not write. Move them elsewhere, or choose another output folder")
    remove_listed(folder, owned_files, owned_dirs)


def remove_listed(folder, owned_files, owned_dirs=(WORK_DIR,)) -> None:
    """Remove ``owned_files`` (relative POSIX paths) and ``owned_dirs`` from ``folder``, and
    our temporary files beside them, then the folders on their way that are left empty;
    nothing else, whatever else the folder holds."""
    import shutil

    folder = Path(folder)
    for d in owned_dirs:
        p = folder / d
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
    parents = {Path(f).parent for f in owned_files}
    for rel in owned_files:
        with contextlib.suppress(FileNotFoundError):
            (folder / rel).unlink()
    for d in parents:
        if (folder / d).is_dir():
            for e in os.scandir(folder / d):
                if e.is_file(follow_symlinks=False) and is_debris(e.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.path)
    on_the_way = {p for d in parents for p in (d, *d.parents) if str(p) != "."}
    for d in sorted(on_the_way, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):  # only folders left empty
            (folder / d).rmdir()


def remove_debris(folder) -> int:
    """Remove ue_fast's temporary files (left by a killed write) anywhere under ``folder``;
    returns how many."""
    n = 0
    for rel, is_dir in list(_entries(Path(folder))):
        if not is_dir and is_debris(rel.rsplit("/", 1)[-1]):
            with contextlib.suppress(FileNotFoundError):
                (Path(folder) / rel).unlink()
                n += 1
    return n


# ----------------------------------------------------------------------------- paths of a command


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _inside(inner: Path, outer: Path) -> bool:
    i, o = inner.resolve(), outer.resolve()
    return i == o or o in i.parents


def check_output_folder(out, inputs: dict, flag: str) -> None:
    """Refuse an output folder ``out`` (given as ``flag``) that is, or lies inside, or holds one
    of the command's input data sets ``inputs`` ({what: path or None})."""
    out = Path(out)
    for what, path in inputs.items():
        if path is None or isinstance(path, (tuple, list)):
            continue
        p = Path(path)
        if not p.exists():
            continue
        if _inside(out, p if p.is_dir() else p.parent) and (p.is_dir() or _same(out, p)):
            raise ValueError(f"{flag} {_display(out)} is inside the {what} {_display(p)}: its outputs would be "
                             f"read as part of that data set next time; choose a folder outside it")
        if _inside(p, out) and out.exists():
            raise ValueError(f"the {what} {_display(p)} is inside {flag} {_display(out)}: choose an output "
                             "folder that holds no input")


def check_output_file(out, inputs: dict, flag: str, *, kind: str, suffixes=None, others: dict | None = None) -> None:
    """Refuse an output file ``out`` (given as ``flag``) that is one of the command's inputs
    (``inputs``: {what: path}), that shares its name with another output of the command
    (``others``: {what: path}), whose suffix is not one of ``suffixes``, or that exists and
    is not a file of ``kind`` ("json" or "png"): a command never writes over its own input
    or over a file of another kind."""
    out = Path(out)
    if suffixes and out.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {_display(out)}: expected a {' or '.join(suffixes)} file name ({kind})")
    for what, path in inputs.items():
        if path is not None and _same(out, Path(path)):
            raise ValueError(f"{flag} {_display(out)} is the {what} this command reads: choose another name")
        if path is not None and Path(path).is_dir() and _inside(out, Path(path)):
            raise ValueError(f"{flag} {_display(out)} is inside the {what} {_display(path)}, which this command "
                             "reads: write it outside the data set")
    for what, path in (others or {}).items():
        if path is not None and out.resolve() == Path(path).resolve():
            raise ValueError(f"{flag} {_display(out)} would also be the {what}: two outputs cannot share one name")
    if out.is_dir():
        raise ValueError(f"{flag} {_display(out)} is a folder; give a file name")
    if out.exists() and not _is_kind(out, kind):
        raise ValueError(f"{flag} {_display(out)} exists and is not a {kind.upper()} file: refusing to write over it")


def _is_kind(path: Path, kind: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if kind == "png":
        return head.startswith(b"\x89PNG\r\n\x1a\n")
    if kind == "json":
        return head.lstrip()[:1] in (b"{", b"[")
    raise ValueError(f"unknown kind {kind!r}")


# ----------------------------------------------------------------------------- readable errors


def explain_os_error(e: OSError, where=None) -> str | None:
    """One line a person can act on for the OS errors of writing: a full disk, a read-only
    file system, a permission refused; None for others."""
    place = _display(where if where is not None else (e.filename or "the output folder"))
    if e.errno == errno.ENOSPC:
        return f"the disk holding {place} is full{_free(where or e.filename)}"
    if e.errno == errno.EROFS:
        return f"{place} is on a read-only file system: choose an output folder on a writable disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied writing {place}: choose a folder you can write to"
    if e.errno == errno.EDQUOT:
        return f"the disk quota for {place} is exhausted{_free(where or e.filename)}"
    return None


def _free(path) -> str:
    import shutil

    p = Path(path) if path is not None else None
    while p is not None and not p.exists():
        p = p.parent if p != p.parent else None
    if p is None:
        return ""
    try:
        return f" ({human_size(shutil.disk_usage(p).free)} free)"
    except OSError:
        return ""


def human_size(n: float) -> str:
    """Bytes as "3.1 GiB", "250 MiB", "12 KiB"."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- outputs inside inputs


class NestedOutputWarning(UserWarning):
    """A folder about to be read as a data set holds a ue_fast output (which would be read as data)."""


def nested_outputs(root) -> list[str]:
    """The sub-folders of the image folder ``root`` (its would-be classes) that are ue_fast
    outputs rather than classes of images: an APBench export (``<type>_poisons/`` with its
    ``index.json``), a report's ``cells/`` (or a report folder), a protect output (its
    ``manifest.json``)."""
    root = Path(root)
    found = []
    try:
        subs = sorted((e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return found
    for e in subs:
        p = Path(e.path)
        if e.name.endswith("_poisons") and any(p.glob("*/index.json")):
            found.append(f"{e.name}/ (an export-apbench output)")
        elif (e.name == "cells" and any(p.glob("*.json"))) or (p / "report.json").is_file():
            found.append(f"{e.name}/ (a report's cells)" if e.name == "cells" else f"{e.name}/ (a report)")
        elif (p / "manifest.json").is_file() or (p / WORK_DIR).is_dir():
            found.append(f"{e.name}/ (a protect output)")
    return found


def warn_nested_outputs(root, what: str) -> None:
    """Warn (:class:`NestedOutputWarning`) when the image folder ``root``, about to be read as
    ``what``, holds ue_fast outputs that would be read as classes of images."""
    import warnings

    if root is None or not Path(root).is_dir():
        return
    found = nested_outputs(root)
    if found:
        warnings.warn(f"the {what} {_display(root)} holds ue_fast output(s) that would be read as classes of "
                      f"images: {', '.join(found)}; move them out of it", NestedOutputWarning, stacklevel=3)
