"""The field's data sets as their authors distribute them, read in their own index order.

Other unlearnable-example code (the MI-UE and EM authors' evaluation, APBench) reads
CIFAR and SVHN through torchvision and adds perturbation ``i`` to image ``i`` of that
order. Reading the same files here keeps that order for every output of ``protect``.

Formats (:func:`detect` tells them apart, :func:`load_dataset` reads them):

- ``cifar10``: ``cifar-10-batches-py/`` (or a folder holding it): ``data_batch_1`` ..
  ``data_batch_5`` (train, in that order), ``test_batch``, class names from
  ``batches.meta``'s ``label_names``.
- ``cifar100``: ``cifar-100-python/`` (or a folder holding it): ``train``, ``test``,
  the 100 fine labels and ``meta``'s ``fine_label_names``.
- ``svhn``: a ``.mat`` file (``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``)
  or a folder holding them: ``X`` [32, 32, 3, N], ``y`` in 1..10 where 10 is the digit 0
  (torchvision's mapping); classes "0".."9". Needs SciPy (``scipy.io.loadmat``).
- ``arrays``: a ``.npz`` with ``x`` (uint8 [N, H, W, 3]) and ``y`` (integers [N]), and
  optionally ``classes`` (strings); or a folder holding ``x.npy`` and ``y.npy`` (and
  optionally ``classes.npy``). Read with ``allow_pickle=False``.

The CIFAR batches are Python pickles. They are read by :class:`RestrictedUnpickler`,
which admits only what those files hold (dicts, lists, strings, bytes, numbers and
numpy arrays) and refuses any other global with :class:`UnsafePickleError`: a file
that tries to import anything else (``os.system``, ...) is never executed.

Every set is returned as an :class:`~ue_fast.data.folders.ImageSet` in index order, its
paths ``<class>/<index>.png`` (zero-padded), its ``origin`` recording the format, the
split and the file(s) read.

Labels must be integers: an integer array, or floats that are all whole numbers (3.0,
as MATLAB and some exports store them); a label such as 3.7, NaN, a boolean or a string
is refused with the file and an example, never truncated. Class names stored as bytes
are decoded as UTF-8 (not shown as ``"b'cat'"``).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .folders import ImageSet, images_from_arrays

FORMATS = ("cifar10", "cifar100", "svhn", "arrays")
SPLITS = ("train", "test", "extra")

_CIFAR10 = ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta")
_CIFAR100 = ("cifar-100-python", ["train"], ["test"], "meta")
_SVHN = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


class UnsafePickleError(ValueError):
    """A pickle names a global that a CIFAR batch never holds: refused, nothing executed."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only containers, strings, bytes, numbers and plain numpy arrays.

    The globals admitted are the ones numpy's own array pickling uses (``_reconstruct``,
    ``ndarray``, ``dtype``, ``scalar``) and ``_codecs.encode`` (how protocol 2 writes
    ``bytes`` from Python 3). Anything else raises :class:`UnsafePickleError` before it
    is looked up, so no code named by the file runs.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def __init__(self, file, *, name: str = "pickle"):
        super().__init__(file, encoding="latin1")  # the CIFAR files are Python 2 pickles
        self.name = name

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UnsafePickleError(f"{self.name} refers to {module}.{name}, which a CIFAR batch never holds: "
                                    "refusing to unpickle it (only dicts, lists, strings, bytes, numbers and "
                                    "numpy arrays are read)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.name} uses persistent ids, which a CIFAR batch never holds")


def restricted_load(path) -> dict:
    """Read one CIFAR batch file (a pickled dict) with :class:`RestrictedUnpickler`.

    Keys come back as ``str`` whether the file wrote them as Python 2 strings or as
    ``bytes``; an array of Python objects is refused.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            obj = RestrictedUnpickler(f, name=str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise ValueError(f"cannot read {path} as a CIFAR batch: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    out = {}
    for k, v in obj.items():
        key = k.decode("latin1") if isinstance(k, bytes) else k
        if isinstance(v, np.ndarray) and v.dtype == object:
            raise ValueError(f"{path}: {key!r} is an array of Python objects; a CIFAR batch holds none")
        out[key] = v
    return out


def _cifar_dir(path: Path, name: str, marker: str) -> Path | None:
    """``path`` itself, or ``path/name``, when it holds ``marker``."""
    for d in (path, path / name):
        if (d / marker).is_file():
            return d
    return None


def detect(path) -> str | None:
    """The format (one of ``FORMATS``) of the data set at ``path``, or None (an image folder,
    or nothing known)."""
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        return {".mat": "svhn", ".npz": "arrays"}.get(suffix)
    if not p.is_dir():
        return None
    if _cifar_dir(p, _CIFAR10[0], _CIFAR10[3]) is not None:
        return "cifar10"
    if _cifar_dir(p, _CIFAR100[0], _CIFAR100[3]) is not None:
        return "cifar100"
    if any((p / f).is_file() for f in _SVHN.values()):
        return "svhn"
    if (p / "x.npy").is_file() and (p / "y.npy").is_file():
        return "arrays"
    return None


def _check_split(split: str, allowed) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)} for this data set, got {split!r}")


def _field(batch: dict, key: str, path: Path):
    if key not in batch:
        raise ValueError(f"{path} has no {key!r} entry (found {sorted(batch)}): not a CIFAR batch")
    return batch[key]


def _int_labels(y, where, key: str = "labels") -> np.ndarray:
    """Labels as int64 [N]: integers, or floats that are all whole numbers. Anything else
    (3.7, NaN, inf, booleans, strings, objects) is refused naming ``where`` and a value."""
    y = np.asarray(y)
    flat = y.reshape(-1)
    if y.dtype == np.bool_ or y.dtype.kind not in "iuf":
        example = f" (e.g. {flat[0]!r})" if flat.size else ""
        raise ValueError(f"{where}: {key!r} must hold integer class labels, found {y.dtype}{example}")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(flat) | (flat != np.round(flat)) if flat.size else np.zeros(0, bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: {key!r} holds labels that are not whole numbers (e.g. {float(flat[i])!r} "
                             f"at index {i}, of {int(bad.sum())}); labels are class indices, refusing to round them")
        if flat.size and (flat.min() < np.iinfo(np.int64).min or flat.max() > np.iinfo(np.int64).max):
            raise ValueError(f"{where}: {key!r} holds labels out of range (e.g. {float(flat.max())!r})")
    elif y.dtype.kind == "u" and flat.size and int(flat.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{where}: {key!r} holds labels out of range (e.g. {int(flat.max())})")
    return y.astype(np.int64)


def _class_names(values, where) -> list[str]:
    """Class names as str (bytes decoded as UTF-8, as Python 3 pickles and numpy 'S' arrays hold them)."""
    out = []
    for c in (values.reshape(-1).tolist() if isinstance(values, np.ndarray) else list(values)):
        if isinstance(c, (bytes, np.bytes_)):
            try:
                c = bytes(c).decode("utf-8")
            except UnicodeDecodeError:
                c = bytes(c).decode("latin1")
        out.append(str(c))
    return out


def _read_cifar(path: Path, fmt: str, split: str):
    name, train, test, meta_name = _CIFAR10 if fmt == "cifar10" else _CIFAR100
    _check_split(split, ("train", "test"))
    root = _cifar_dir(path, name, meta_name)
    meta = restricted_load(root / meta_name)
    classes = _class_names(_field(meta, "label_names" if fmt == "cifar10" else "fine_label_names",
                                  root / meta_name), root / meta_name)
    label_key = "labels" if fmt == "cifar10" else "fine_labels"
    xs, ys, files = [], [], []
    for f in (train if split == "train" else test):
        fp = root / f
        if not fp.is_file():
            raise FileNotFoundError(f"{fp} is missing: the {split} split of {fmt} needs {', '.join(train if split == 'train' else test)}")
        batch = restricted_load(fp)
        data = np.asarray(_field(batch, "data", fp))
        labels = _int_labels(_field(batch, label_key, fp), fp, label_key)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{fp}: 'data' must be uint8 [N, 3072], found {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],):
            raise ValueError(f"{fp}: {data.shape[0]} images but {labels.size} labels")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane, each row-major
        ys.append(labels)
        files.append(str(fp))
    return np.concatenate(xs), np.concatenate(ys), classes, files


def _read_svhn(path: Path, split: str):
    if path.is_dir():
        _check_split(split, SPLITS)
        path = path / _SVHN[split]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the SVHN {split} split is {_SVHN[split]}")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"reading {path} (SVHN, a MATLAB file) needs SciPy: pip install scipy") from None
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:
        raise ValueError(f"cannot read {path} as an SVHN .mat file: {type(e).__name__}: {e}") from None
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path} holds no 'X' and 'y' arrays: not an SVHN file")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise ValueError(f"{path}: 'X' must be uint8 [H, W, 3, N], found {x.dtype} {x.shape}")
    y = _int_labels(np.asarray(y).reshape(-1), path, "y")  # MATLAB stores numbers as doubles: 3.0 is fine
    if y.shape[0] != x.shape[3]:
        raise ValueError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
    y[y == 10] = 0  # SVHN writes the digit 0 as label 10 (torchvision maps it back the same way)
    return np.transpose(x, (3, 2, 0, 1)), y, [str(d) for d in range(10)], [str(path)]


def _read_arrays(path: Path):
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                names = set(z.files)
                if not {"x", "y"} <= names:
                    raise ValueError(f"{path} must hold arrays 'x' (uint8 [N, H, W, 3]) and 'y' (labels [N]); "
                                     f"it holds {sorted(names)}")
                x, y = z["x"], z["y"]
                classes = z["classes"] if "classes" in names else None
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ValueError(f"{path} holds Python objects; only plain arrays are read") from None
            raise
        files = [str(path)]
    else:
        x = np.load(path / "x.npy", allow_pickle=False)
        y = np.load(path / "y.npy", allow_pickle=False)
        c = path / "classes.npy"
        classes = np.load(c, allow_pickle=False) if c.is_file() else None
        files = [str(path / "x.npy"), str(path / "y.npy")]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{path}: 'x' must be uint8 [N, H, W, 3] (NHWC), found {x.dtype} {x.shape}")
    if classes is not None:
        classes = _class_names(np.asarray(classes), path)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), _int_labels(y, path, "y"), classes, files


def load_dataset(path, split: str = "train", fmt: str | None = None) -> ImageSet:
    """Read the data set at ``path`` (format detected unless ``fmt``) in its index order.

    split: "train" or "test" for CIFAR and an SVHN folder ("extra" too for SVHN); a single
    ``.mat``/``.npz`` file is its own split and ignores it. Returns an ImageSet whose image
    ``i`` is the data set's image ``i``; ``origin`` records the format, split and files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data set not found: {path}")
    fmt = fmt or detect(path)
    if fmt not in FORMATS:
        raise ValueError(f"{path} is not a data set this version reads ({', '.join(FORMATS)}): expected "
                         "cifar-10-batches-py/, cifar-100-python/, an SVHN .mat, a .npz with x and y, or a "
                         "folder with x.npy and y.npy")
    if fmt in ("cifar10", "cifar100"):
        x, y, classes, files = _read_cifar(path, fmt, split)
    elif fmt == "svhn":
        x, y, classes, files = _read_svhn(path, split)
    else:
        x, y, classes, files = _read_arrays(path)
    single_file = path.is_file()
    try:
        data = images_from_arrays(torch.from_numpy(np.ascontiguousarray(x)), y, classes)
    except (ValueError, TypeError) as e:  # labels out of range, bad class names, ...: name the data set
        raise type(e)(f"{path} ({fmt}): {e}") from None
    data.origin = {"format": fmt, "split": None if single_file else split, "order": "index",
                   "path": str(path), "files": files}
    return data


def num_images(fmt: str, split: str = "train") -> int | None:
    """How many images the standard distribution of ``fmt`` holds in ``split`` (None: unknown)."""
    return {("cifar10", "train"): 50000, ("cifar10", "test"): 10000, ("cifar100", "train"): 50000,
            ("cifar100", "test"): 10000, ("svhn", "train"): 73257, ("svhn", "test"): 26032,
            ("svhn", "extra"): 531131}.get((fmt, split))


def read_dataset(path, split: str = "train", *, order=None, resize=None, skip_bad: bool = False,
                 progress: bool = False) -> ImageSet:
    """Any data set input by path, through its source (:mod:`ue_fast.data.sources`): a
    distribution (:func:`load_dataset`, in its index order; ``split`` chooses its split) or an
    image folder (``read_image_folder``, sorted or in the order of ``order``; a folder is its
    own split)."""
    from .sources import find_source

    src = find_source(Path(path))
    src.check(path, order=order, resize=resize)
    return src.read(path, split=split, order=order, resize=resize, skip_bad=skip_bad, progress=progress)
