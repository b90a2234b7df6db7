"""Tables of images: Parquet files (an image column of bytes, or the Hugging Face ``datasets``
Image struct ``{bytes, path}``, and a label column), and folders that ``datasets``'
``save_to_disk`` wrote (Arrow stream files with ``dataset_info.json``), read with pyarrow
alone, batch by batch (nothing is loaded whole).

Which files: one ``.parquet``; a glob of them; a folder holding ``*.parquet`` (or the Hub's
layout, ``data/*.parquet``), sorted by name; a ``save_to_disk`` folder (its ``.arrow``
files in ``state.json``'s order). Rows are read in file order, then row order. A
``ClassLabel`` label column's names (the ``huggingface`` schema metadata, or
``dataset_info.json``) become the classes; integer labels without names number them;
string labels are class names, sorted.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

from .decode import display_path

HINT = "pip install 'ue-fast[parquet]'"
IMAGE_COLUMNS = ("image", "img", "png", "jpg", "jpeg", "webp")
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls", "class", "target")
BATCH = 256


def pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Parquet and Arrow inputs are read with pyarrow: {HINT}") from e
    return pyarrow


def _saved_dataset(p: Path) -> bool:
    return p.is_dir() and (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def is_table_spec(source) -> bool:
    if not isinstance(source, (str, Path)):
        return False
    s = str(source)
    if s.endswith(".parquet"):
        return True
    p = Path(s)
    return p.is_dir() and (_saved_dataset(p) or any(p.glob("*.parquet")) or any(p.glob("data/*.parquet")))


def list_tables(source) -> tuple[list[Path], str]:
    """The files ``source`` names, in order, and their kind: "parquet" or "arrow"."""
    s, p = str(source), Path(source)
    if _saved_dataset(p):
        state = json.loads((p / "state.json").read_text())
        files = [p / f["filename"] for f in state.get("_data_files", [])] or sorted(p.glob("*.arrow"))
        return files, "arrow"
    if p.is_dir():
        files = sorted(p.glob("*.parquet")) or sorted(p.glob("data/*.parquet"))
    elif glob.has_magic(s):
        files = [Path(x) for x in sorted(glob.glob(s))]
    else:
        files = [p]
    if not files:
        raise FileNotFoundError(f"no Parquet file matches {s!r}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Parquet file not found: {display_path(missing[0])}")
    return files, "parquet"


def schema_of(path: Path, kind: str):
    pa = pyarrow()
    try:
        if kind == "parquet":
            return pa.parquet.ParquetFile(path).schema_arrow
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).schema
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read {display_path(path)}: {e}") from None


def batches(path: Path, kind: str, columns=None):
    """The record batches of one file, in order."""
    pa = pyarrow()
    try:
        if kind == "parquet":
            yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=BATCH, columns=columns)
        else:
            with pa.memory_map(str(path)) as src:
                for b in pa.ipc.open_stream(src):
                    yield b.select(columns) if columns else b
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read {display_path(path)}: {e} (a truncated or damaged file?)") from None


def hf_features(path: Path, schema, kind: str, source) -> dict:
    """The ``datasets`` features recorded with the data (schema metadata, or dataset_info.json)."""
    meta = schema.metadata or {}
    if b"huggingface" in meta:
        try:
            return json.loads(meta[b"huggingface"]).get("info", {}).get("features", {}) or {}
        except ValueError:
            return {}
    info = Path(source) / "dataset_info.json"
    if kind == "arrow" and info.is_file():
        return json.loads(info.read_text()).get("features", {}) or {}
    return {}


def pick_columns(schema, image_key, label_key, where: str) -> tuple[str, str]:
    names = schema.names
    for key, default, what, flag in ((image_key, IMAGE_COLUMNS, "image", "--image-key"),
                                     (label_key, LABEL_COLUMNS, "label", "--label-key")):
        if key is not None and key not in names:
            raise ValueError(f"{where} has no column {key!r} ({flag}); its columns: {', '.join(names)}")
    image = image_key or next((c for c in IMAGE_COLUMNS if c in names), None)
    label = label_key or next((c for c in LABEL_COLUMNS if c in names), None)
    if image is None:
        raise ValueError(f"{where} has no image column (none of {', '.join(IMAGE_COLUMNS)}; name one with "
                         f"--image-key); its columns: {', '.join(names)}")
    if label is None:
        raise ValueError(f"{where} has no label column (none of {', '.join(LABEL_COLUMNS)}; name one with "
                         f"--label-key); its columns: {', '.join(names)}")
    return image, label


def image_bytes(value, base: Path) -> bytes | None:
    """A cell of the image column: bytes, or the ``datasets`` Image struct (its bytes, else the
    file its path names, relative to the data's folder)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            p = Path(value["path"])
            p = p if p.is_absolute() else base / p
            return p.read_bytes() if p.is_file() else None
    return None
