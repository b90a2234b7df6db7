"""LMDB environments in (ue_fast.data.sources.lmdb): the two layouts read, in their order."""
import os
import pickle

import pytest
import torch

import ue_fast
from _helpers import demo_files
from ue_fast.data import demo_dir, read_dataset, read_image_folder

lmdb = pytest.importorskip("lmdb")

OPS = dict(method="ops", device="cpu", progress=False)
CLASSES = demo_files()[2]


@pytest.fixture(scope="module")
def demo30():
    return demo_files()[:2]


def _env(path, items):
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in items:
            txn.put(k, v)
    env.close()
    return path


def _keys_list(path, files, labels, edit=None):
    keys = [f"{i}".encode() for i in range(len(files))]
    items = [(k, pickle.dumps((f.read_bytes(), y))) for k, f, y in zip(keys, files, labels)]
    items += [(b"__keys__", pickle.dumps(keys)), (b"__len__", pickle.dumps(len(keys)))]
    return _env(path, [edit(k, v) if edit else (k, v) for k, v in items])


def test_both_layouts_read_in_their_order(tmp_path, demo30):
    files, labels = demo30
    a = _keys_list(tmp_path / "a", files, labels)
    items = [(b"num-samples", str(len(files)).encode())]
    for i, (f, y) in enumerate(zip(files, labels), 1):
        items += [(b"image-%09d" % i, f.read_bytes()), (b"label-%09d" % i, str(y).encode())]
    b = _env(tmp_path / "b", items)
    folder = read_image_folder(demo_dir() / "train", progress=False)
    expected = torch.stack([folder.images[folder.paths.index(f"{f.parent.name}/{f.name}")] for f in files])
    for env in (a, b):
        data = read_dataset(env)
        assert torch.equal(data.images, expected) and data.labels.tolist() == labels
        assert data.classes == [str(i) for i in range(10)]
    m = ue_fast.protect(a, tmp_path / "out", **OPS)
    assert m["dataset"]["format"] == "lmdb" and m["dataset"]["layout"] == "keys-list" and m["num_images"] == 30
    assert (tmp_path / "out" / "0" / "0.png").is_file()


def test_what_is_not_read_is_refused_with_the_reason(tmp_path, demo30):
    files, labels = demo30

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    evil = _keys_list(tmp_path / "evil", files, labels, lambda k, v: (k, pickle.dumps(Evil())) if k == b"3" else (k, v))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        ue_fast.protect(evil, tmp_path / "out", **OPS)
    legacy = _keys_list(tmp_path / "legacy", files, labels, lambda k, v: (k, b"ARROW1" + v) if k == b"3" else (k, v))
    with pytest.raises(ValueError, match="pyarrow.serialize"):
        ue_fast.protect(legacy, tmp_path / "out", **OPS)
    other = _env(tmp_path / "other", [(b"x", b"y")])
    with pytest.raises(ValueError, match="neither __keys__ .* nor num-samples"):
        ue_fast.protect(other, tmp_path / "out", **OPS)
    cut = _keys_list(tmp_path / "cut", files, labels,
                     lambda k, v: (k, pickle.dumps((pickle.loads(v)[0][:60], 1))) if k == b"5" else (k, v))
    with pytest.raises(ValueError, match="sample '5' .* cannot decode"):
        ue_fast.protect(cut, tmp_path / "out", **OPS)
    assert not (tmp_path / "out").exists()
    m = ue_fast.protect(cut, tmp_path / "out", skip_bad=True, **OPS)
    assert m["num_images"] == 29 and m["skipped"][0]["path"].endswith(":5")


def test_keys_do_not_apply_to_lmdb(tmp_path, demo30):
    env = _keys_list(tmp_path / "a", *demo30)
    with pytest.raises(ValueError, match="apply to WebDataset shards and Parquet tables"):
        ue_fast.protect(env, tmp_path / "out", image_key="jpg", **OPS)
