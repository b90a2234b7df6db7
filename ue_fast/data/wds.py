"""WebDataset shards: which files a shard pattern names, and the samples a shard holds.

A shard is a POSIX tar file; a sample is the run of consecutive members that share a
key, the member's path up to the first dot of its file name (``a/b/0001.jpg`` and
``a/b/0001.cls`` are the sample ``a/b/0001`` with members ``jpg`` and ``cls``), as
WebDataset's own reader groups them. Shards are listed, never loaded: a scan reads the
tar headers and seeks over the data, and a member's bytes are read by offset later.
"""
from __future__ import annotations

import glob
import json
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import display_path

SHARD_SUFFIXES = (".tar",)
LIST_SUFFIXES = (".txt", ".lst", ".shards")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff", "gif")
HINT = "pip install 'ue-fast[webdataset]'"


def _brace(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError as e:
        raise ImportError(f"a brace pattern of shards ({pattern!r}) is expanded with braceexpand, which "
                          f"WebDataset installs: {HINT}") from e
    return list(braceexpand(pattern))


def is_shard_spec(source) -> bool:
    """Whether ``source`` names WebDataset shards: a .tar, a brace pattern or glob of them, or a
    list file (``.txt``/``.lst``/``.shards``) whose first line names a .tar."""
    if not isinstance(source, (str, Path)):
        return False
    s = str(source)
    p = Path(s)
    if p.is_dir():  # a folder named like a shard is still a folder
        return False
    if s.endswith(SHARD_SUFFIXES) or ("{" in s and ".tar" in s) or (glob.has_magic(s) and s.endswith(".tar")):
        return True
    if p.suffix in LIST_SUFFIXES and p.is_file():
        with open(p, encoding="utf-8", errors="replace") as f:
            first = next((line.strip() for line in f if line.strip() and not line.startswith("#")), "")
        return first.endswith(SHARD_SUFFIXES)
    return False


def list_shards(source) -> list[Path]:
    """The shard files ``source`` names, in its order: a brace pattern's expansion order, a glob's
    sorted matches, a list file's lines (relative to the list's folder). Each must exist."""
    s = str(source)
    p = Path(s)
    if p.suffix in LIST_SUFFIXES and p.is_file():
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
        shards = [q if q.is_absolute() else p.parent / q for q in map(Path, names)]
    elif "{" in s:
        shards = [Path(x) for x in _brace(s)]
    elif glob.has_magic(s):
        shards = [Path(x) for x in sorted(glob.glob(s))]
        if not shards:
            raise FileNotFoundError(f"no shard matches {s!r}")
    else:
        shards = [p]
    missing = [x for x in shards if not x.is_file()]
    if missing:
        raise FileNotFoundError(f"shard not found: {display_path(missing[0])}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return shards


@dataclass
class Sample:
    shard: int  # index in the shard list
    key: str
    members: dict  # extension -> (offset of the data, size)


class SampleRows:
    """The samples of a WebDataset input, row by row, in columns of machine integers (a
    sample's members as Python dicts cost about 1.7 KB; here 8 bytes a number): per row its
    shard, its image member and each member's offset and size in the shard."""

    def __init__(self):
        self.n = 0
        self.shard, self.image = array("q"), array("q")
        self.exts: list[str] = []  # every member extension seen, in order of first sight
        self.offset: list[array] = []  # per extension: per row, the data's offset, -1 where absent
        self.size: list[array] = []

    def add(self, sample: Sample, image: str) -> None:
        for ext in sample.members:
            if ext not in self.exts:
                self.exts.append(ext)
                self.offset.append(array("q", [-1]) * self.n)
                self.size.append(array("q", [0]) * self.n)
        self.shard.append(sample.shard)
        self.image.append(self.exts.index(image))
        for k, ext in enumerate(self.exts):
            off, size = sample.members.get(ext, (-1, 0))
            self.offset[k].append(off)
            self.size[k].append(size)
        self.n += 1

    def image_member(self, r: int) -> tuple[int, tuple[int, int]]:
        """Row ``r``'s shard and its image member's (offset, size)."""
        k = self.image[r]
        return self.shard[r], (self.offset[k][r], self.size[k][r])

    def table(self, keep: list[int]) -> np.ndarray:
        """int64 [len(keep), 2 + 2E]: shard, image extension's column, then offset and size per
        extension of ``exts`` (what :class:`SampleIndex` reads)."""
        cols = [self.shard, self.image] + [c for k in range(len(self.exts)) for c in (self.offset[k], self.size[k])]
        rows = np.asarray(keep, dtype=np.int64)
        return np.stack([np.frombuffer(c, dtype=np.int64)[rows] for c in cols], axis=1)


class SampleIndex:
    """Per row of an ingested WebDataset input, its sample: ``index[i]`` is ``{"shard", "key",
    "image", "members": {ext: (offset, size)}}``, made when asked from ``table`` (a
    :meth:`SampleRows.table`, memory-mapped from the work folder), the extensions ``exts`` and
    the rows' ``paths`` (``<key>.<image ext>``); ``shard`` is the int64 column of shards.
    ``members`` lists a sample's members in their order in the shard (by offset)."""

    def __init__(self, table: np.ndarray, exts: list[str], paths: list[str]):
        if table.ndim != 2 or table.shape != (len(paths), 2 + 2 * len(exts)):
            raise ValueError(f"a WebDataset sample index of shape {table.shape} does not match {len(paths)} rows "
                             f"and {len(exts)} member extensions: ingest anew")
        self.table, self.exts, self.paths = table, list(exts), paths
        self.shard = table[:, 0]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        row = self.table[i].tolist()
        image = self.exts[row[1]]
        at = sorted((row[2 + 2 * k], row[3 + 2 * k], ext) for k, ext in enumerate(self.exts) if row[2 + 2 * k] >= 0)
        members = {ext: (off, size) for off, size, ext in at}  # in the shard's order, as scanned
        return {"shard": row[0], "key": self.paths[i][:-len(image) - 1], "image": image, "members": members}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def split_name(name: str) -> tuple[str, str]:
    """``a/b/0001.seg.png`` -> (``a/b/0001``, ``seg.png``), as WebDataset splits a member name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def scan_shard(path: Path, index: int) -> list[Sample]:
    """The samples of one shard, in order. A truncated or damaged tar is an error naming it."""
    samples: list[Sample] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_name(m.name)
                if key.rpartition("/")[2].startswith(".") or not ext:  # hidden files, names without extension
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(Sample(index, key, {}))
                samples[-1].members[ext] = (m.offset_data, m.size)
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"cannot read shard {display_path(path)}: {e} (a truncated or damaged tar file)") from None
    # tarfile stops quietly at a cut inside a header or the last member's data: a whole tar file
    # goes on with its end-of-archive marker, a zero block, where the members end.
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(512)
    if len(marker) < 512 or marker.count(0) != 512:
        raise ValueError(f"cannot read shard {display_path(path)}: it ends without a tar file's end-of-archive "
                         f"marker after {len(samples)} sample(s) (a truncated tar file)")
    return samples


def read_member(path: Path, where: tuple[int, int]) -> bytes:
    offset, size = where
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"shard {display_path(path)} ends inside a member (a truncated tar file)")
    return data


def label_of(sample: Sample, shard: Path, label_key: str | None):
    """The sample's label: the integer in its ``cls`` member, or the field ``label_key`` of its
    ``json`` member (an integer or a class name)."""
    where = f"sample {sample.key!r} of shard {display_path(shard)}"
    if label_key is None:
        if "cls" not in sample.members:
            raise ValueError(f"{where} has no label: no .cls member (name a field of its .json with "
                             "--label-key)")
        text = read_member(shard, sample.members["cls"]).decode("utf-8", errors="replace").strip()
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}: its .cls is {text[:40]!r}, not an integer label") from None
    if "json" not in sample.members:
        raise ValueError(f"{where} has no .json member to read the label field {label_key!r} from")
    try:
        doc = json.loads(read_member(shard, sample.members["json"]))
    except ValueError as e:
        raise ValueError(f"{where}: its .json does not parse ({e})") from None
    if not isinstance(doc, dict) or label_key not in doc:
        raise ValueError(f"{where}: its .json has no field {label_key!r}")
    value = doc[label_key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: its label {label_key!r} is {value!r}, neither an integer nor a class name")
    return value


def image_ext(sample: Sample, shard: Path, image_key: str | None) -> str:
    """Which member holds the image: ``image_key``, or the first present of ``IMAGE_KEYS``."""
    where = f"sample {sample.key!r} of shard {display_path(shard)}"
    if image_key is not None:
        if image_key not in sample.members:
            raise ValueError(f"{where} has no .{image_key} member (--image-key); it has "
                             f"{', '.join(sorted(sample.members))}")
        return image_key
    for ext in IMAGE_KEYS:
        if ext in sample.members:
            return ext
    raise ValueError(f"{where} has no image member (none of {', '.join(IMAGE_KEYS)}; name one with --image-key); "
                     f"it has {', '.join(sorted(sample.members))}")
