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

import io
import pickle
from pathlib import Path

from ..canonical import RestrictedUnpickler, UnsafePickleError
from ..decode import display_path
from ._stream import IMAGES_FILE, StreamedSource, classes_of, decode_stream, settle, skip_or_raise

HINT = "pip install 'ue-fast[lmdb]'"


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


class LMDB(StreamedSource):
    name = "lmdb"
    index_file = "lmdb.json"
    own_order = "is an LMDB environment, read in its own order"
    keyed = False  # its layouts say where the image and the label are

    def matches(self, source) -> bool:
        return isinstance(source, (str, Path)) and _is_env(Path(source))

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


    def files(self, source) -> list[Path]:
        p = Path(source)
        return [p / "data.mdb" if p.is_dir() else p]

    def build(self, source, work: Path, size, skip_bad: bool, workers: int, progress: bool) -> dict:
        skipped, keys, labels = [], [], []
        with self._open(source) as env, env.begin(buffers=True) as txn:
            layout, all_keys = self._layout(txn, source)
            for key in all_keys:  # the labels first: small values, or one unpickle each
                _, label, why = self._sample(txn, layout, key, source)
                if why is not None:
                    skip_or_raise(skip_bad, skipped, f"{display_path(source)}:{key.decode(errors='replace')}", why)
                    continue
                keys.append(key)
                labels.append(label)
            if not keys:
                raise ValueError(f"no samples with an image and a label in {source}")

            def where(j):
                return f"sample {keys[j].decode(errors='replace')!r} of {display_path(source)}"

            classes, labels = classes_of(labels, where)
            shape, bad = decode_stream(((j, self._sample(txn, layout, k, source)[0]) for j, k in enumerate(keys)),
                                       len(keys), work / IMAGES_FILE, size, workers, progress, source)
        keep = settle(bad, shape, work / IMAGES_FILE, skip_bad, skipped, where, "image",
                      lambda j: f"{display_path(source)}:{keys[j].decode(errors='replace')}")
        return {"shape": [len(keep), *shape[1:]], "classes": classes, "labels": [labels[j] for j in keep],
                "paths": [f"{labels[j]}/{keys[j].decode(errors='replace').replace('/', '_')}.png" for j in keep],
                "skipped": skipped, "origin": {"format": "lmdb", "layout": layout, "order": "keys",
                                               "path": str(source)}}
