"""Parquet files and datasets folders in and out (ue_fast.data.sources.parquet,
ue_fast.data.sinks.parquet), checked with pyarrow alone and with datasets."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import ue_fast
from _helpers import demo_files
from ue_fast.data import demo_dir, read_dataset, read_image_folder

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

OPS = dict(method="ops", device="cpu", progress=False)
CLASSES = demo_files()[2]


@pytest.fixture(scope="module")
def demo30():
    return demo_files()[:2]


def _hf_table(files, labels):
    """A table as datasets writes it: the Image struct, a ClassLabel, a caption, the features in the metadata."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"},
                                  "caption": {"dtype": "string", "_type": "Value"}}}}
    import json
    schema = pa.schema([("image", image_type), ("label", pa.int64()), ("caption", pa.string())],
                       metadata={"huggingface": json.dumps(meta)})
    return pa.table({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files], "label": labels,
                     "caption": [f"photo {i}" for i in range(len(files))]}, schema=schema)


@pytest.fixture(scope="module")
def tables(tmp_path_factory, demo30):
    root = tmp_path_factory.mktemp("pq")
    files, labels = demo30
    t = _hf_table(files, labels)
    (root / "hub" / "data").mkdir(parents=True)
    pq.write_table(t.slice(0, 17), root / "hub" / "data" / "train-00000-of-00002.parquet", row_group_size=8)
    pq.write_table(t.slice(17), root / "hub" / "data" / "train-00001-of-00002.parquet")
    plain = pa.table({"img": [f.read_bytes() for f in files], "target": [CLASSES[k] for k in labels]})
    pq.write_table(plain, root / "plain.parquet")
    return root


def test_a_hub_layout_table_protected_into_parquet_that_pyarrow_and_datasets_read(tables, tmp_path, demo30):
    out = tmp_path / "out"
    m = ue_fast.protect(tables / "hub", out, output_format="parquet", **OPS)
    assert m["classes"] == CLASSES and m["num_images"] == 30 and m["dataset"]["format"] == "parquet"
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    before = pa.concat_tables([pq.read_table(tables / "hub" / "data" / n) for n in names])
    after = pa.concat_tables([pq.read_table(out / n) for n in names])
    assert after.schema.equals(before.schema, check_metadata=True)  # the datasets features kept
    assert after.column("label").equals(before.column("label")) and after.column("caption").equals(before.column("caption"))
    delta = np.load(out / m["perturbation_npy"])
    for i, (a, b) in enumerate(zip(before.column("image").to_pylist(), after.column("image").to_pylist())):
        assert b["path"] == a["path"].rsplit(".", 1)[0] + ".png"
        clean = np.asarray(Image.open(io.BytesIO(a["bytes"])).convert("RGB")).astype(int)
        protected = np.asarray(Image.open(io.BytesIO(b["bytes"]))).astype(int)
        assert (protected - clean == delta[i].transpose(1, 2, 0)).all()
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=[str(out / n) for n in names], split="train")
    assert ds.features["label"].names == CLASSES and ds[0]["image"].size == (32, 32)


def test_plain_columns_named_by_keys_and_string_labels(tables, demo30, tmp_path):
    files, labels = demo30
    data = read_dataset(tables / "plain.parquet")
    assert data.classes == CLASSES and data.labels.tolist() == labels  # string labels: sorted names
    folder = read_image_folder(demo_dir() / "train", progress=False)
    first = folder.paths.index(f"{CLASSES[0]}/{files[0].name}")
    assert torch.equal(data.images[0], folder.images[first])
    with pytest.raises(ValueError, match="no column 'picture'"):
        ue_fast.protect(tables / "plain.parquet", tmp_path / "out", image_key="picture", **OPS)
    assert not (tmp_path / "out").exists()


def test_a_datasets_folder_in_and_parquet_out(tmp_path, demo30):
    datasets = pytest.importorskip("datasets")
    files, labels = demo30
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": None} for f in files], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}))
    ds.save_to_disk(str(tmp_path / "saved"))
    m = ue_fast.protect(tmp_path / "saved", tmp_path / "out", output_format="parquet", **OPS)
    assert m["dataset"]["format"] == "arrow" and m["classes"] == CLASSES
    out = list((tmp_path / "out").glob("*.parquet"))
    assert len(out) == 1 and pq.read_table(out[0]).num_rows == 30


def test_bad_rows_are_named_or_skipped(tmp_path, demo30):
    files, labels = demo30
    cells = [f.read_bytes() for f in files]
    cells[4] = cells[4][:50]
    pq.write_table(pa.table({"image": cells, "label": labels}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row 4 of .*bad.parquet: cannot decode"):
        ue_fast.protect(tmp_path / "bad.parquet", tmp_path / "out", **OPS)
    m = ue_fast.protect(tmp_path / "bad.parquet", tmp_path / "out", skip_bad=True, output_format="parquet", **OPS)
    assert m["num_images"] == 29 and m["skipped"][0]["path"].endswith("bad.parquet:4")
    assert pq.read_table(tmp_path / "out" / "bad.parquet").num_rows == 29
    bad_label = labels[:]
    bad_label[2] = 10
    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())],
                       metadata={"huggingface": '{"info": {"features": {"label": {"names": %s}}}}'
                                 % str(CLASSES).replace("'", '"')})
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "label": bad_label}, schema=schema),
                   tmp_path / "label.parquet")
    with pytest.raises(ValueError, match="row 2 of .*label.parquet: label 10 is outside the class list"):
        ue_fast.protect(tmp_path / "label.parquet", tmp_path / "out2", **OPS)
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "label.parquet").read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.parquet"):
        ue_fast.protect(tmp_path / "cut.parquet", tmp_path / "out3", **OPS)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_evaluate_reads_a_protected_table_against_its_clean_table(tables, tmp_path):
    from ue_fast.evaluate import evaluate

    ue_fast.protect(tables / "hub", tmp_path / "out", output_format="parquet", **OPS)
    r = evaluate(tmp_path / "out", tables / "hub", clean=tables / "hub", arch="cnn-small", epochs=1, reference=True,
                 device="cpu", progress=False)
    assert r["num_train"] == 30 and r["pairs_checked"]["count"] == 30
