"""WebDataset shards in and out (ue_fast.data.sources.webdataset, ue_fast.data.sinks.webdataset),
checked with the webdataset package's own loader."""
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import ue_fast
from ue_fast.data import demo_dir, read_dataset
from ue_fast.data.sinks import webdataset as wds_sink

wds = pytest.importorskip("webdataset")

OPS = dict(method="ops", device="cpu", progress=False)


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """30 demo images (3 per class) in two shards, each sample with jpg, cls, json and txt members."""
    root = tmp_path_factory.mktemp("wds")
    files = [(k, f) for k, d in enumerate(sorted(p for p in (demo_dir() / "train").iterdir() if p.is_dir()))
             for f in sorted(d.glob("*.jpg"))[:3]]
    for s in range(2):
        with tarfile.open(root / f"train-{s:06d}.tar", "w") as tar:
            for i, (k, f) in enumerate(files[s * 15:(s + 1) * 15]):
                key = f"part{s}/{i:04d}"
                _add(tar, f"{key}.jpg", f.read_bytes())
                _add(tar, f"{key}.cls", str(k).encode())
                _add(tar, f"{key}.json", json.dumps({"name": f.parent.name, "n": i}).encode())
                _add(tar, f"{key}.txt", f"a photo of a {f.parent.name}".encode())
    return root


def _samples(pattern):
    return list(wds.WebDataset(str(pattern), shardshuffle=False))


def test_shards_protected_into_shards_that_webdataset_loads(shards, tmp_path):
    pattern = str(shards / "train-{000000..000001}.tar")
    out = tmp_path / "out"
    m = ue_fast.protect(pattern, out, output_format="webdataset", **OPS)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not list(out.rglob("*.png")) and (out / m["perturbation_npy"]).exists()
    assert m["dataset"]["format"] == "webdataset" and m["num_images"] == 30 and m["classes"] == [str(i) for i in range(10)]
    before, after = _samples(pattern), _samples(out / "train-{000000..000001}.tar")
    assert [s["__key__"] for s in after] == [s["__key__"] for s in before]  # keys and order kept
    delta = np.load(out / m["perturbation_npy"])
    for i, (a, b) in enumerate(zip(before, after)):
        assert set(b) - {"__key__", "__url__", "__local_path__"} == {"png", "cls", "json", "txt"}
        assert all(a[k] == b[k] for k in ("cls", "json", "txt"))  # every other member byte for byte
        clean = np.asarray(Image.open(io.BytesIO(a["jpg"])).convert("RGB")).astype(int)
        protected = np.asarray(Image.open(io.BytesIO(b["png"]))).astype(int)
        assert (protected - clean == delta[i].transpose(1, 2, 0)).all()
    # a rerun writes the same bytes
    again = tmp_path / "again"
    ue_fast.protect(pattern, again, output_format="webdataset", **OPS)
    assert (again / "train-000001.tar").read_bytes() == (out / "train-000001.tar").read_bytes()


def test_glob_list_file_and_one_tar_name_the_same_shards_in_order(shards, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"{shards / f'train-{s:06d}.tar'}\n" for s in range(2)))
    sets = [read_dataset(spec) for spec in (str(shards / "train-*.tar"), listing,
                                            str(shards / "train-{000000..000001}.tar"))]
    for d in sets[1:]:
        assert torch.equal(d.images, sets[0].images) and torch.equal(d.labels, sets[0].labels)
        assert d.paths == sets[0].paths
    one = read_dataset(shards / "train-000001.tar")
    assert torch.equal(one.images, sets[0].images[15:]) and one.paths[0] == "part1/0000.jpg"


def test_a_png_tree_from_shards_and_labels_from_a_json_field(shards, tmp_path):
    m = ue_fast.protect(str(shards / "train-*.tar"), tmp_path / "out", label_key="name", **OPS)
    assert m["classes"] == sorted(p.name for p in (demo_dir() / "train").iterdir() if p.is_dir())
    assert (tmp_path / "out" / "part0" / "0000.png").is_file() and m["files"][0]["output"] == "part0/0000.png"


def _copy_with(shards, tmp_path, edit):
    """The two shards rewritten member by member through ``edit(name, data)`` (None drops)."""
    d = tmp_path / "bad"
    d.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        with tarfile.open(shards / name) as src, tarfile.open(d / name, "w") as dst:
            for m in src:
                data = edit(m.name, src.extractfile(m).read())
                if data is not None:
                    _add(dst, m.name, data)
    return str(d / "train-*.tar")


@pytest.mark.parametrize("edit, text", [
    (lambda n, b: b[:100] if n == "part0/0000.jpg" else b, "'part0/0000' .* cannot decode"),  # the very first
    (lambda n, b: None if n == "part1/0003.jpg" else b, "'part1/0003' .* has no image member"),
    (lambda n, b: None if n == "part1/0003.cls" else b, "'part1/0003' .* has no label"),
    (lambda n, b: b[:100] if n == "part1/0003.jpg" else b, "'part1/0003' .* cannot decode"),
    (lambda n, b: b"-1" if n == "part1/0003.cls" else b, "'part1/0003' .* below 0"),
])
def test_a_bad_sample_is_named_or_skipped_and_listed(shards, tmp_path, edit, text):
    pattern = _copy_with(shards, tmp_path, edit)
    with pytest.raises(ValueError, match=text):
        ue_fast.protect(pattern, tmp_path / "out", **OPS)
    assert not (tmp_path / "out").exists()
    if "below" in text:
        return
    m = ue_fast.protect(pattern, tmp_path / "out", skip_bad=True, output_format="webdataset", **OPS)
    key = text.split("'")[1]
    assert m["num_images"] == 29 and key in m["skipped"][0]["path"]
    assert key not in [s["__key__"] for s in _samples(tmp_path / "out" / "train-{000000..000001}.tar")]


def test_a_truncated_shard_is_an_error_naming_it(shards, tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    data = (shards / "train-000001.tar").read_bytes()
    (d / "train-000001.tar").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="train-000001.tar.*truncated"):
        ue_fast.protect(str(d / "train-000001.tar"), tmp_path / "out", **OPS)


def test_what_cannot_apply_is_refused_before_anything_is_written(shards, tmp_path):
    pattern, out = str(shards / "train-*.tar"), tmp_path / "out"
    with pytest.raises(ValueError, match="lossy.*itself a defence"):
        ue_fast.protect(pattern, out, output_format="jpeg", **OPS)
    with pytest.raises(ValueError, match="webdataset input"):
        ue_fast.protect(demo_dir() / "test", out, output_format="webdataset", **OPS)
    with pytest.raises(ValueError, match="apply to WebDataset"):
        ue_fast.protect(demo_dir() / "test", out, image_key="png", **OPS)
    with pytest.raises(ValueError, match=r"no \.webp member"):
        ue_fast.protect(pattern, out, image_key="webp", **OPS)
    with pytest.raises(FileNotFoundError, match=r"train-000002.tar \(and 7 more\)"):
        ue_fast.protect(str(shards / "train-{000000..000009}.tar"), out, **OPS)
    assert not out.exists()


def test_samples_with_different_members_keep_each_its_own(tmp_path):
    """The sample index (a table of offsets, not a dict per sample) gives every sample its own
    members: some lack one, one has an extension no other has, one's image is a png."""
    from ue_fast.data.wds import scan_shard

    imgs = sorted((demo_dir() / "train" / "cat").glob("*.jpg"))[:4]
    png = io.BytesIO()
    Image.open(imgs[3]).save(png, format="PNG")
    members = [{"jpg": imgs[0].read_bytes(), "cls": b"0"},
               {"jpg": imgs[1].read_bytes(), "cls": b"1", "txt": b"a caption"},
               {"jpg": imgs[2].read_bytes(), "cls": b"0", "seg.png": png.getvalue(), "json": b"{}"},
               {"png": png.getvalue(), "cls": b"1"}]
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for i, m in enumerate(members):
            for ext, data in m.items():
                _add(tar, f"s{i}.{ext}", data)
    data = read_dataset(str(tmp_path / "mixed.tar"))
    scanned = scan_shard(tmp_path / "mixed.tar", 0)
    assert len(data.members) == 4 and data.members.shard.tolist() == [0, 0, 0, 0]
    for i, s in enumerate(scanned):
        assert data.members[i] == {"shard": 0, "key": s.key, "image": "png" if i == 3 else "jpg",
                                   "members": s.members}
    out = tmp_path / "out"
    ue_fast.protect(str(tmp_path / "mixed.tar"), out, output_format="webdataset", **OPS)
    with tarfile.open(out / "mixed.tar") as tar:
        names = tar.getnames()
        assert tar.extractfile("s1.txt").read() == b"a caption"
        assert tar.extractfile("s2.seg.png").read() == png.getvalue()
    assert names == ["s0.png", "s0.cls", "s1.png", "s1.cls", "s1.txt", "s2.png", "s2.cls", "s2.seg.png", "s2.json",
                     "s3.png", "s3.cls"]


def test_an_interrupted_output_resumes_to_the_same_shards(shards, tmp_path, monkeypatch):
    pattern = str(shards / "train-*.tar")
    ue_fast.protect(pattern, tmp_path / "whole", output_format="webdataset", **OPS)
    real, calls = wds_sink.WebDatasetShards._start, []

    def stop(self, shard):
        calls.append(shard)
        if len(calls) == 2:  # the first shard written, the second about to start
            raise KeyboardInterrupt
        real(self, shard)

    monkeypatch.setattr(wds_sink.WebDatasetShards, "_start", stop)
    with pytest.raises(KeyboardInterrupt):
        ue_fast.protect(pattern, tmp_path / "split", output_format="webdataset", keep_checkpoint=True, **OPS)
    monkeypatch.undo()
    assert not (tmp_path / "split" / "manifest.json").exists()
    ue_fast.protect(pattern, tmp_path / "split", output_format="webdataset", resume=True, **OPS)
    for name in ("train-000000.tar", "train-000001.tar"):
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not [p for p in (tmp_path / "split").iterdir() if p.name.endswith(".tmp")]


def test_the_cli_protects_shards_and_evaluates_them_against_their_clean_counterparts(shards, tmp_path, capsys):
    from ue_fast.cli import main

    pattern = str(shards / "train-{000000..000001}.tar")
    out = tmp_path / "out"
    assert main(["protect", pattern, str(out), "--method", "ops", "--output-format", "webdataset", "--device", "cpu",
                 "--no-progress"]) == 0
    assert "WebDataset shards" in capsys.readouterr().out
    assert main(["evaluate", "--train", str(out / "train-*.tar"), "--clean", str(shards / "train-*.tar"), "--test",
                 str(shards / "train-000001.tar"), "--arch", "cnn-small", "--epochs", "1", "--reference",
                 "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pairs checked: 30 protected/clean pairs" in printed and "30 of 30 pairs" in printed


def test_a_folder_named_like_a_shard_is_read_as_a_folder(tmp_path):
    folder = tmp_path / "photos.tar"
    shutil.copytree(demo_dir() / "test", folder)
    assert ue_fast.data.sources.find_source(folder).name == "image-folder"
    assert len(read_dataset(folder)) == 200
