"""Atomic checkpoints of a generation run, for exact resume.

A checkpoint is one ``torch.save`` file written to a temporary name in the same
directory, flushed to disk and renamed over the previous one, so a kill at any
moment leaves either the old or the new checkpoint, never a torn file. It holds
only tensors, numbers, strings, lists and dicts, and is read back with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

# 3: a disk store's perturbations are files the checkpoint names; AP's best restart is a store.
# 2: the runner's stages (ue_fast.generation); 1 was the single bi-level loop's.
FORMAT = 3

# protect's default seconds between checkpoints. Each writes the whole perturbation store: 0.9 s
# for CIFAR-10's 50,000 images, 3.5 s for 2,000 images at 224 px (2-core CPU); once a minute that
# is a few percent of a run at most, and a crash loses at most a minute of work.
CHECKPOINT_EVERY = 60.0


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle of arbitrary objects)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"{path} is not a ue_fast checkpoint")
    if state["format"] != FORMAT:
        raise ValueError(f"{path} is a checkpoint of format {state['format']} (an earlier ue_fast); this version "
                         f"resumes format {FORMAT} only: start the run anew (--overwrite)")
    return state
