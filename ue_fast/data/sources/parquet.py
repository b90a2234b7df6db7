"""Parquet files and ``datasets.save_to_disk`` folders (see :mod:`ue_fast.data.tables`), read
in their own order (file order, then row order) with pyarrow. The image comes from the
column ``image_key`` (default: the first of image, img, png, jpg, jpeg, webp), as bytes or
the ``datasets`` Image struct; the label from ``label_key`` (default: the first of label,
labels, fine_label, cls, class, target). Labels are read first (one column, cheap); then
the images are decoded batch by batch, in parallel, into the run's work folder
(``images.npy``, out of core), which a resumed run reuses when no file changed."""
from __future__ import annotations

from pathlib import Path

from ..decode import display_path
from ..tables import batches, hf_features, image_bytes, is_table_spec, list_tables, pick_columns, schema_of
from ._stream import IMAGES_FILE, StreamedSource, classes_of, decode_stream, settle, skip_or_raise


class Parquet(StreamedSource):
    name = "parquet"
    index_file = "table.json"
    own_order = "is a table, read in its own row order"

    def matches(self, source) -> bool:
        return is_table_spec(source)

    def check_input(self, source, *, order=None, main: bool = True) -> None:
        files, kind = list_tables(source)
        pick_columns(schema_of(files[0], kind), self.image_key, self.label_key, display_path(files[0]))

    def files(self, source) -> list[Path]:
        return list_tables(source)[0]

    def build(self, source, work: Path, size, skip_bad: bool, workers: int, progress: bool) -> dict:
        files, kind = list_tables(source)
        schema = schema_of(files[0], kind)
        image, label = pick_columns(schema, self.image_key, self.label_key, display_path(files[0]))
        for f in files[1:]:
            if schema_of(f, kind).names != schema.names:
                raise ValueError(f"{display_path(f)} has other columns than {display_path(files[0])}")
        rows, values, skipped = [], [], []  # (file, row) and label of every row with a usable label
        for i, f in enumerate(files):  # the labels first: one column
            r = 0
            for b in batches(f, kind, [label]):
                for v in b.column(0).to_pylist():
                    if v is None or isinstance(v, bool) or not isinstance(v, (int, str)):
                        skip_or_raise(skip_bad, skipped, f"row {r} of {display_path(f)}",
                                      f"row {r} of {display_path(f)} has no usable label ({v!r})")
                    else:
                        rows.append((i, r))
                        values.append(v)
                    r += 1
        if not rows:
            raise ValueError(f"no rows with a label in {source}")

        def where(j):
            return f"row {rows[j][1]} of {display_path(files[rows[j][0]])}"

        features = hf_features(files[0], schema, kind, source)
        classes, labels = classes_of(values, where, (features.get(label) or {}).get("names"))
        position = {fr: j for j, fr in enumerate(rows)}
        base = Path(source) if Path(source).is_dir() else files[0].parent

        def cells():
            for i, f in enumerate(files):
                r = 0
                for b in batches(f, kind, [image]):
                    for v in b.column(0).to_pylist():
                        j = position.get((i, r))
                        if j is not None:
                            yield j, image_bytes(v, base)
                        r += 1

        shape, bad = decode_stream(cells(), len(rows), work / IMAGES_FILE, size, workers, progress, source)
        keep = settle(bad, shape, work / IMAGES_FILE, skip_bad, skipped, where, repr(image),
                      lambda j: f"{display_path(files[rows[j][0]])}:{rows[j][1]}")
        return {"shape": [len(keep), *shape[1:]], "classes": classes, "labels": [labels[j] for j in keep],
                "paths": [f"{files[rows[j][0]].stem}/{rows[j][1]:08d}.png" for j in keep], "skipped": skipped,
                "origin": {"format": "parquet" if kind == "parquet" else "arrow", "order": "rows", "path": str(source),
                           "files": [str(f) for f in files], "image_key": image, "label_key": label,
                           "features": features or None},
                "members": [list(rows[j]) for j in keep]}  # for the parquet sink: which row of which file
