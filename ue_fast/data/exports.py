"""Outputs of a protection run: perturbation tensors and JSON manifests.

Every write is atomic: the data goes to a hidden temporary file in the target's
directory, is fsynced, and replaces the target with ``os.replace``. A crash or a
failed write leaves either the old file or the new one, never a torn one.

Formats:
- ``poison.pt``: ``torch.save`` of a float32 tensor [N, 3, H, W] of perturbations
  in [-eps, eps], in the order of the images (what the MI-UE authors' evaluation
  and EM scripts load).
- ``delta.npy``: int8 [N, 3, H, W], the perturbation in units of 1/255, readable
  without torch (``np.load(..., allow_pickle=False)``).
Reading never unpickles: ``torch.load(weights_only=True)``, ``allow_pickle=False``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


@functools.cache
def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 & ~umask (mkstemp uses 0o600)."""
    try:  # Linux: read the umask without changing it (os.umask is process-wide)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(d: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path):
    """``with atomic_open(path) as f: f.write(...)``: a binary file that replaces
    ``path`` only if the block completes (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def _check_delta(delta, dtype_ok, what: str) -> torch.Tensor:
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
    if not dtype_ok(delta):
        raise TypeError(f"delta must be {what}, got dtype {delta.dtype}")
    if delta.dim() != 4:
        raise ValueError(f"delta must have shape [N, 3, H, W], got {tuple(delta.shape)}")
    if delta.shape[0] == 0:
        raise ValueError(f"delta is empty: shape {tuple(delta.shape)}")
    t = delta.detach().cpu()
    # torch.save writes a view's whole storage: copy slices (e.g. images[:k]) to their own.
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def save_poison_pt(path, delta: torch.Tensor) -> None:
    """Save perturbations delta [N, 3, H, W] (float; stored as float32 in [-eps, eps])."""
    t = _check_delta(delta, lambda d: d.is_floating_point(), "a floating-point tensor")
    lo, hi = torch.aminmax(t)  # NaN propagates: 30x faster than a boolean copy of isfinite at 224 px
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError("delta holds NaN or infinite values")
    t = t.to(torch.float32)
    with atomic_open(path) as f:
        torch.save(t, f)


def load_poison_pt(path) -> torch.Tensor:
    """Load a ``poison.pt`` -> float32 [N, 3, H, W] on the CPU (no unpickling)."""
    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
        desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{path} does not hold a float tensor [N, 3, H, W]: found {desc}")
    return t.to(torch.float32)


def save_delta_npy(path, delta_int8: torch.Tensor) -> None:
    """Save an int8 (or, beyond +-127, int16) perturbation [N, 3, H, W] (units of 1/255) as .npy."""
    t = _check_delta(delta_int8, lambda d: d.dtype in (torch.int8, torch.int16), "int8 or int16 (units of 1/255)")
    with atomic_open(path) as f:
        np.save(f, t.numpy(), allow_pickle=False)


def load_delta_npy(path) -> torch.Tensor:
    """Load a perturbation .npy -> int8 (or int16) tensor [N, 3, H, W], units of 1/255."""
    a = np.load(path, allow_pickle=False)
    if a.dtype not in (np.int8, np.int16) or a.ndim != 4:
        raise ValueError(f"{path} does not hold an int8/int16 array [N, 3, H, W]: found {a.dtype} {a.shape}")
    return torch.from_numpy(a)


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as UTF-8 JSON (indent 2, keys in insertion order, final newline).

    Text stays readable (non-ASCII characters are written as UTF-8), except lone
    surrogates, which UTF-8 cannot hold: the bytes of a file name that are not valid
    UTF-8 (``os.listdir`` gives ``"\\udcff"`` for the byte 0xff) are written as the JSON
    escape ``\\udcff``, which :func:`read_json` (any ``json.loads``) reads back to the
    same ``str``, so such a path round-trips and names the same file.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    # Only surrogates fail to encode, and "backslashreplace" writes one as \udcff: exactly
    # its JSON escape (they can only occur inside JSON strings).
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


def read_json(path):
    """Read a JSON file written by :func:`write_json_atomic` (UTF-8; escaped lone surrogates
    come back as the ``str`` written). A file that is not JSON is a ValueError naming it."""
    data = Path(path).read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
        raise ValueError(f"{path} is not a readable JSON file ({e}): damaged or not written by ue_fast") from None
