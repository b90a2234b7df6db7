"""The output folder of a ``protect`` run: refused when it is not ue_fast's (or holds the
input), held by one run at a time, replaced only of what ue_fast wrote, left as it was when
a run fails with nothing to resume; and the OS errors of writing into it, said in words a
person can act on."""
from __future__ import annotations

import contextlib
import errno
from pathlib import Path, PurePosixPath

from .data.exports import read_json
from .outputs import (
    check_not_held,
    check_output_folder,
    entries_besides_locks,
    explain_os_error,
    hold,
    remove_debris,
    remove_listed,
    remove_owned,
)
from .outputs import (
    human_size as _size,
)

CHECKPOINT_DIR = ".ue_fast"
OUTPUTS_FILE = "outputs.json"  # in the work folder: what the run is about to write, before it writes it


def _check_dirs(input_dir: Path | None, output_dir: Path, overwrite: bool, resume: bool) -> None:
    check_output_folder(output_dir, {"input folder": input_dir}, "the output folder")
    out = output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    if out.is_dir():
        check_not_held(out)
    if out.exists() and entries_besides_locks(out):
        if not (overwrite or resume):
            raise ValueError(f"output folder {output_dir} is not empty: pass overwrite=True (--overwrite) to "
                             "replace an earlier ue_fast output, or resume=True (--resume) to continue an "
                             "interrupted run")
        if not is_ue_fast_output(output_dir):
            raise ValueError(f"refusing to {'replace' if overwrite else 'resume in'} {output_dir}: it is not a "
                             f"ue_fast output (no manifest.json of ue_fast, no {CHECKPOINT_DIR}/ folder); "
                             f"it holds {_describe(out)}. Choose another output folder, or empty this one yourself")


class WriteError(ValueError):
    """Writing an output or the work folder failed for a reason the user can fix (a full disk,
    a read-only file system, a permission): the message says what and what to do."""


@contextlib.contextmanager
def _readable_write_errors(output_dir: Path, ckpt: Path):
    """Turn the OS errors of writing (and torch.save's report of a short write) into a
    :class:`WriteError` that says where, roughly how much the run needs, and how to go on."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        torch_short_write = isinstance(e, RuntimeError) and ("unexpected pos" in str(e)
                                                              or "failed writing" in str(e))
        if isinstance(e, OSError):
            what = explain_os_error(e, e.filename or output_dir)
        elif torch_short_write:
            what = f"writing a file in {output_dir} stopped short ({str(e).splitlines()[0]}): is the disk full?"
        else:
            what = None
        if what is None:
            raise
        full = torch_short_write or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        images = output_dir / CHECKPOINT_DIR / "images.npy"
        need = (f"; the run needs roughly {_size(7 * images.stat().st_size)} there (the ingested images, "
                "the PNG copy, the perturbations as .npy and as float32 poison.pt)") if full and images.exists() else ""
        if ckpt.exists():
            go_on = "free space and run the same command with --resume: it continues from the last finished step"
        elif (output_dir / CHECKPOINT_DIR).exists():  # before the first checkpoint (--checkpoint-every)
            go_on = ("free space and run the same command with --resume: no step was checkpointed yet, so the "
                     "generation starts over in the same folder")
        else:
            go_on = "free space (or choose another output folder) and run the command again"
        raise WriteError(f"{what}{need}; {go_on}" if full else what) from e


def is_ue_fast_output(folder: Path) -> bool:
    """True if ``folder`` holds an earlier ``protect`` output: its work folder, or a manifest it
    wrote. A manifest.json that cannot be read is an error naming it."""
    manifest = _manifest_of(folder)
    return (folder / CHECKPOINT_DIR).is_dir() or (isinstance(manifest, dict) and "ue_fast_version" in manifest)


def _manifest_of(folder: Path):
    """The parsed ``folder/manifest.json``, None if there is none; a ValueError naming the file
    if it is there but not JSON."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}): a damaged manifest; if {folder} is an earlier ue_fast "
                         "output, remove it yourself, or choose another output folder") from None


def owned_outputs(folder: Path) -> set[str]:
    """What an earlier ``protect`` run wrote in ``folder`` (relative paths of files), as its
    manifest and its work folder's ``outputs.json`` (written before the first output file)
    record it; its work folder ``.ue_fast/`` is ue_fast's too."""
    owned = set()
    manifest = _manifest_of(folder)
    if isinstance(manifest, dict) and "ue_fast_version" in manifest:
        owned.add("manifest.json")
        owned.update(f["output"] for f in manifest.get("files") or () if isinstance(f, dict) and "output" in f)
        owned.update(k for k in manifest.get("outputs") or {} if k != "images")
    try:
        planned = read_json(folder / CHECKPOINT_DIR / OUTPUTS_FILE)
        owned.update(planned["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {str(PurePosixPath(o)) for o in owned if isinstance(o, str) and not PurePosixPath(o).is_absolute()
            and ".." not in PurePosixPath(o).parts}


@contextlib.contextmanager
def _output_run(output_dir: Path, main: bool, overwrite: bool, resume: bool, ckpt: Path):
    """The output folder for one run: created if missing, held (one run at a time), replaced of
    only what ue_fast wrote (``overwrite``), rid of an interrupted write's temporary files
    (``resume``). If the run fails with nothing to resume (no checkpoint), what it wrote is
    removed again, and the folder too if it created it."""
    if not main:
        yield
        return
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with hold(output_dir, "ue-fast protect"):
            if overwrite and entries_besides_locks(output_dir):
                remove_owned(output_dir, owned_outputs(output_dir), "an earlier ue_fast output")
            elif resume:
                remove_debris(output_dir)
                if (output_dir / "manifest.json").exists() and not ckpt.exists():
                    raise ValueError(f"{output_dir} already holds a complete run (manifest.json); nothing to resume")
            try:
                yield
            except BaseException:
                if not ckpt.exists():  # nothing to resume: leave nothing of this run behind
                    remove_listed(output_dir, owned_outputs(output_dir))
                raise
    finally:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()


def _describe(folder: Path, limit: int = 5) -> str:
    """'notes.txt, sub/ and 3 more' for the error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
