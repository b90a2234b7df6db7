"""LMDB environments of encoded images with labels, read-only, streamed in their own order.
Two layouts are read (``--image-key``/``--label-key`` do not apply):

- **keys-list** (``folder2lmdb`` of Efficient-PyTorch / pytorch_lmdb_imagenet, the tool that
  DiffPure, and so AVATAR, points to for ImageNet): ``__keys__`` holds the pickled list of
  sample keys, in order; each sample's value is a pickled ``(image bytes, label)``. Pickles
  are read by the restricted unpickler (containers, strings, bytes, numbers only: no code
  runs). The tool's first version serialised with ``pyarrow.serialize``, which pyarrow
  removed in version 12: such an environment is refused, with how to convert it.
- **numbered** (the CRNN convention): ``num-samples``, then ``image-000000001`` and
  ``label-000000001`` (1-based, 9 digits), the label an integer as text.

Integer labels number the classes ``0`` to the largest. The images are decoded in parallel
into the run's work folder (out of core), reused on resume when the environment is unchanged.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..canonical import RestrictedUnpickler, UnsafePickleError
from ..decode import _check_resize, display_path
from ..exports import write_json_atomic
from ..folders import ImageSet
from ..ingest import _compact, _map, default_workers
from ._stream import bad_reason, decode_stream
from .base import Source

HINT = "pip install 'ue-fast[lmdb]'"
INDEX_FILE, IMAGES_FILE = "lmdb.json", "images.npy"
VERSION = 1


def _lmdb():
    try:
        import lmdb
    except ImportError as e:
        raise ImportError(f"LMDB inputs are read with the lmdb package: {HINT}") from e
    return lmdb


def _is_env(p: Path) -> bool:
    return (p.is_dir() and (p / "data.mdb").is_file()) or (p.is_file() and p.suffix in (".lmdb", ".mdb"))


def _loads(data: bytes, what: str):
    if data[:1] != b"\x80":  # not a pickle (protocol 2+): pyarrow.serialize's, or something else
        raise ValueError(f"{what} is not a pickle: an environment written with pyarrow.serialize (removed in pyarrow "
                         "12) or another serialiser; rewrite it with pickle (folder2lmdb's current version) or "
                         "export it as an image folder")
    try:
        return RestrictedUnpickler(io.BytesIO(data), name=what).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{what} does not unpickle: {e}") from None


class LMDB(Source):
    name = "lmdb"

    def matches(self, source) -> bool:
        return isinstance(source, (str, Path)) and _is_env(Path(source))

    def check(self, source, *, order=None, split: str = "train", resize=None) -> None:
        if order is not None:
            raise ValueError(f"order applies to an image-folder source; {source} is an LMDB environment, read in its "
                             "own order")
        if split != "train":
            raise ValueError(f"split {split!r} applies to a CIFAR or SVHN distribution; {source} is read whole")

    def check_input(self, source, *, order=None, main: bool = True) -> None:
        with self._open(source) as env, env.begin() as txn:
            self._layout(txn, source)

    def _open(self, source):
        p = Path(source)
        return _lmdb().open(str(p), subdir=p.is_dir(), readonly=True, lock=False, readahead=False, meminit=False)

    def _layout(self, txn, source) -> tuple[str, list[bytes]]:
        """("keys-list" or "numbered", the sample keys in order)."""
        raw = txn.get(b"__keys__")
        if raw is not None:
            keys = _loads(bytes(raw), f"{source}: __keys__")
            if not isinstance(keys, (list, tuple)) or not all(isinstance(k, (bytes, str)) for k in keys):
                raise ValueError(f"{source}: __keys__ is not a list of keys")
            return "keys-list", [k if isinstance(k, bytes) else k.encode() for k in keys]
        raw = txn.get(b"num-samples")
        if raw is not None:
            try:
                n = int(bytes(raw).decode().strip())
            except ValueError:
                raise ValueError(f"{source}: num-samples is {bytes(raw)[:20]!r}, not a count") from None
            return "numbered", [b"image-%09d" % i for i in range(1, n + 1)]
        raise ValueError(f"{source} has neither __keys__ (folder2lmdb's layout) nor num-samples (the numbered "
                         "layout): see the layouts ue_fast reads in the documentation (data sets: LMDB)")

    def _sample(self, txn, layout: str, key: bytes, source):
        """(image bytes or None, label or None, what went wrong or None)."""
        where = f"sample {key.decode(errors='replace')!r} of {display_path(source)}"
        value = txn.get(key)
        if value is None:
            return None, None, f"{where} is listed but missing"
        if layout == "numbered":
            label = txn.get(b"label-" + key[len(b"image-"):])
            try:
                return bytes(value), int(bytes(label).decode().strip()), None
            except (TypeError, ValueError, AttributeError):
                return None, None, f"{where} has no integer label"
        item = _loads(bytes(value), where)
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], (bytes, bytearray))
                and isinstance(item[1], int) and not isinstance(item[1], bool)):
            return None, None, f"{where} is not (image bytes, integer label)"
        return bytes(item[0]), item[1], None

    def read(self, source, *, resize=None, skip_bad: bool = False, progress: bool = False, **_):
        with tempfile.TemporaryDirectory() as work:
            data = self.ingest(source, Path(work), resize=resize, skip_bad=skip_bad, progress=progress, workers=1)
            data.images = torch.from_numpy(np.array(data.images.numpy()))
            data.file = None
            return data

    def ingest(self, source, work, *, resize=None, skip_bad: bool = False, workers=None, progress: bool = True,
               stats=None, main: bool = True, barrier=None, **_):
        work = Path(work)
        if not main:
            barrier()
            return self._load(work)
        data = self._ingest(source, work, resize, skip_bad, workers or default_workers(), progress, stats)
        if barrier is not None:
            barrier()
        return data

    def _load(self, work: Path) -> ImageSet:
        meta = json.loads((work / INDEX_FILE).read_text())
        if list(np.load(work / IMAGES_FILE, mmap_mode="r").shape) != meta["shape"]:
            raise ValueError(f"{display_path(work / IMAGES_FILE)} does not match its index: ingest anew")
        return ImageSet(_map(work / IMAGES_FILE), torch.tensor(meta["labels"], dtype=torch.int64), meta["classes"],
                        meta["paths"], meta["skipped"], file=work / IMAGES_FILE, origin=meta["origin"])

    def _ingest(self, source, work: Path, resize, skip_bad, workers, progress, stats) -> ImageSet:
        t0 = time.perf_counter()
        size = _check_resize(resize)
        p = Path(source)
        data_file = p / "data.mdb" if p.is_dir() else p
        st = data_file.stat()
        signature = hashlib.sha256(json.dumps([VERSION, str(p.resolve()), st.st_size, st.st_mtime_ns,
                                               size]).encode()).hexdigest()
        try:
            if json.loads((work / INDEX_FILE).read_text())["signature"] == signature:
                data = self._load(work)
                if stats is not None:
                    stats.update(images=len(data), seconds=time.perf_counter() - t0, images_per_s=None, workers=0,
                                 reused=True)
                return data
        except (OSError, ValueError, KeyError):
            pass
        work.mkdir(parents=True, exist_ok=True)
        (work / INDEX_FILE).unlink(missing_ok=True)
        skipped, keys, labels = [], [], []
        with self._open(source) as env, env.begin(buffers=True) as txn:
            layout, all_keys = self._layout(txn, source)
            for key in all_keys:  # the labels first: small values, or one unpickle each
                _, label, why = self._sample(txn, layout, key, source)
                if why is None and label < 0:
                    why = f"sample {key.decode(errors='replace')!r} of {display_path(source)}: label {label} is below 0"
                if why is not None:
                    if not skip_bad or "below 0" in why:
                        raise ValueError(why + ("" if "below 0" in why else
                                                " (pass skip_bad=True / --skip-bad to skip it)"))
                    skipped.append({"path": f"{display_path(source)}:{key.decode(errors='replace')}", "reason": why})
                    continue
                keys.append(key)
                labels.append(label)
            if not keys:
                raise ValueError(f"no samples with an image and a label in {source}")
            n = len(keys)
            shape, bad = decode_stream(((j, self._sample(txn, layout, k, source)[0]) for j, k in enumerate(keys)), n,
                                       work / IMAGES_FILE, size, workers, progress)
        if shape is None:
            raise ValueError(f"no image in {source} decodes")
        for j, err in sorted(bad.items()):
            why = f"sample {keys[j].decode(errors='replace')!r} of {display_path(source)}: {bad_reason(err, shape, 'image')}"
            if not skip_bad or err[0] == "size":
                raise ValueError(why + ("" if err[0] == "size" else " (pass skip_bad=True / --skip-bad to skip it)"))
            skipped.append({"path": f"{display_path(source)}:{keys[j].decode(errors='replace')}", "reason": why})
        kept = [j for j in range(n) if j not in bad]
        if bad:
            _compact(work / IMAGES_FILE, kept, shape)
        kept_labels = [labels[j] for j in kept]
        meta = {"signature": signature, "shape": [len(kept), *shape[1:]],
                "classes": [str(i) for i in range(max(kept_labels) + 1)], "labels": kept_labels,
                "paths": [f"{labels[j]}/{keys[j].decode(errors='replace').replace('/', '_')}.png" for j in kept],
                "skipped": skipped, "origin": {"format": "lmdb", "layout": layout, "order": "keys",
                                               "path": str(source)}}
        write_json_atomic(work / INDEX_FILE, meta)
        if stats is not None:
            seconds = time.perf_counter() - t0
            stats.update(images=len(kept), seconds=seconds, images_per_s=len(kept) / max(seconds, 1e-9),
                         workers=workers, reused=False)
        return self._load(work)
