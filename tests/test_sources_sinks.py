"""The sources protect, evaluate and report read through, and the sinks protect writes
(ue_fast.data.sources, ue_fast.data.sinks): one contract over every registered one."""
import io
import shutil
import tarfile

import numpy as np
import pytest
import torch

import ue_fast
from ue_fast.data import demo_dir, read_dataset, read_image_folder
from ue_fast.data.sinks import SINKS, Rows, SinkContext
from ue_fast.data.sources import SOURCES, find_source


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same 30 demo images (3 per class) as an image folder, a .npz, arrays, a WebDataset shard, a
    Parquet file and an LMDB environment."""
    root = tmp_path_factory.mktemp("sources")
    folder = root / "folder"
    for d in sorted(p for p in (demo_dir() / "train").iterdir() if p.is_dir()):
        (folder / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.jpg"))[:3]:
            shutil.copy(f, folder / d.name / f.name)
    data = read_image_folder(folder, progress=False)
    np.savez(root / "set.npz", x=data.images.permute(0, 2, 3, 1).numpy(), y=data.labels.numpy())
    arrays = (data.images, data.labels, data.classes)
    with tarfile.open(root / "shard.tar", "w") as tar:
        for i, (path, label) in enumerate(zip(data.paths, data.labels.tolist())):
            for name, payload in ((f"{i:04d}.jpg", (folder / path).read_bytes()), (f"{i:04d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [(folder / p).read_bytes() for p in data.paths], "label": data.labels.tolist()}),
                   root / "table.parquet")
    lmdb = pytest.importorskip("lmdb")
    import pickle

    env = lmdb.open(str(root / "env"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        keys = [str(i).encode() for i in range(len(data))]
        for k, path, label in zip(keys, data.paths, data.labels.tolist()):
            txn.put(k, pickle.dumps(((folder / path).read_bytes(), label)))
        txn.put(b"__keys__", pickle.dumps(keys))
    env.close()
    return {"image-folder": folder, "distribution": root / "set.npz", "arrays": arrays,
            "webdataset": root / "shard.tar", "parquet": root / "table.parquet", "lmdb": root / "env"}, data


def test_every_source_is_found_for_its_input_and_reads_the_same_data(inputs, tmp_path):
    given, data = inputs
    assert set(SOURCES) == set(given), "every registered source needs an input here"
    for name, source in given.items():
        src = find_source(source)
        assert src.name == name
        read = src.read(source)
        ingested = src.ingest(source, tmp_path / name, workers=1, progress=False)
        for got in (read, ingested):  # order, labels and pixels kept
            assert torch.equal(got.images, data.images) and torch.equal(got.labels, data.labels)
            assert len(got.paths) == len(data)
        # a .npz without names, integer .cls labels and an integer column number the classes
        assert got.classes == data.classes or name in ("distribution", "webdataset", "parquet", "lmdb")


@pytest.mark.parametrize("name, options, text", [
    ("arrays", {"order": ["a.png"]}, "own order"), ("arrays", {"split": "test"}, "read whole"),
    ("arrays", {"resize": 16}, "kept at their size"), ("distribution", {"order": ["a.png"]}, "own index order"),
    ("distribution", {"resize": 16}, "kept at its size"), ("image-folder", {"split": "test"}, "read whole"),
    ("webdataset", {"order": ["a.png"]}, "their own order"), ("parquet", {"order": ["a.png"]}, "own row order"),
    ("lmdb", {"split": "test"}, "read whole"),
])
def test_options_a_source_cannot_honour_are_refused_before_anything_is_written(inputs, tmp_path, name, options,
                                                                                 text):
    source = inputs[0][name]
    with pytest.raises(ValueError, match=text):
        SOURCES[name].check(source, **options)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=text):
        ue_fast.protect(source, out, method="ops", device="cpu", progress=False, **options)
    assert not out.exists()


def _context(out, data, eps=8.0, memory_limit=float("inf"), classwise=False, poison_pt="auto"):
    """A sink context over ``data`` (read from the WebDataset shard: the webdataset sink passes its
    members through; the others ignore them)."""
    levels = torch.randint(-8, 9, (len(data.classes), *data.images.shape[1:]), dtype=torch.int16,
                           generator=torch.Generator().manual_seed(1))
    return SinkContext(output_dir=out, paths=data.paths, classes=data.classes, labels=data.labels, alpha=None,
                       shape=tuple(data.images.shape[1:]), eps=eps, memory_limit=memory_limit,
                       class_levels=(lambda: levels) if classwise else None, origin=data.origin,
                       members=getattr(data, "members", None), method="lsp", poison_pt=poison_pt)


def _write(sink, ctx, data, effective, step):
    ctx.output_dir.mkdir(exist_ok=True)
    sink.open(ctx)
    protected = (data.images.to(torch.int16) + effective).clamp(0, 255).to(torch.uint8)
    for a in range(0, len(data), step):
        b = min(len(data), a + step)
        sink.write(Rows(a, b, protected[a:b], effective[a:b]))
    return sink.close()


@pytest.fixture(scope="module")
def cifar10(inputs, tmp_path_factory):
    """The same 30 images as a CIFAR-10 distribution (what the apbench sink writes)."""
    from _helpers import write_cifar10

    data = inputs[1]
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root, data.images.numpy(), data.labels.numpy(), data.classes)
    return root / "cifar-10-batches-py"


@pytest.mark.parametrize("name", list(SINKS))
def test_every_sink_writes_what_it_plans_the_same_whatever_the_chunks(inputs, cifar10, tmp_path, name):
    # what passes through: members, columns; a CIFAR-10 distribution's index order for APBench's layout
    source = {"parquet": inputs[0]["parquet"], "apbench": cifar10}.get(name, inputs[0]["webdataset"])
    data = find_source(source).read(source)
    effective = torch.randint(-8, 9, data.images.shape, generator=torch.Generator().manual_seed(0),
                              dtype=torch.int16)
    files = {}
    for step in (len(data), 7):  # one chunk, and chunks that do not divide N
        out = tmp_path / f"step{step}"
        ctx = _context(out, data, classwise=True)
        notes = _write(SINKS[name](), ctx, data, effective, step)
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert written == sorted(SINKS[name]().planned(ctx)), "a sink writes exactly what it planned"
        assert notes and all(v["written"] and v["why"] for v in notes.values())
        files[step] = {w: (out / w).read_bytes() for w in written}
    assert files[len(data)] == files[7]


def test_poison_pt_over_the_memory_budget_is_not_written_and_says_why(inputs, tmp_path):
    data = inputs[1]
    out = tmp_path / "out"
    out.mkdir()
    (out / "poison.pt").write_bytes(b"an earlier run's")  # in a folder this run replaces
    notes = _write(SINKS["poison.pt"](), _context(out, data, memory_limit=1024), data,
                   torch.zeros(data.images.shape, dtype=torch.int16), 10)
    assert not notes["poison.pt"]["written"] and "memory budget" in notes["poison.pt"]["why"]
    assert not (out / "poison.pt").exists()


@pytest.mark.parametrize("mode, limit, auto_max, written, why", [
    ("auto", float("inf"), 1 << 30, True, "fit the memory budget"),
    ("auto", float("inf"), 1000, False, "--poison-pt auto writes"),
    ("yes", float("inf"), 1000, True, "fit the memory budget"),
    ("yes", 1024, 1 << 30, False, "memory budget"),
    ("no", float("inf"), 1 << 30, False, "--poison-pt no"),
])
def test_poison_pt_is_written_as_its_mode_says(inputs, tmp_path, monkeypatch, mode, limit, auto_max, written, why):
    from ue_fast.data.sinks import poison_pt

    monkeypatch.setattr(poison_pt, "POISON_PT_AUTO", auto_max)  # 30 images of 32 px: 368,640 bytes
    data = inputs[1]
    out = tmp_path / "out"
    notes = _write(SINKS["poison.pt"](), _context(out, data, memory_limit=limit, poison_pt=mode), data,
                   torch.ones(data.images.shape, dtype=torch.int16), 10)
    assert notes["poison.pt"]["written"] == written == (out / "poison.pt").exists()
    assert why in notes["poison.pt"]["why"]
    if not written:
        assert "perturbation_int8.npy holds the same" in notes["poison.pt"]["why"]


def test_an_unknown_poison_pt_mode_is_refused_before_anything_is_written(inputs, tmp_path):
    with pytest.raises(ValueError, match="poison_pt must be one of auto, yes, no"):
        ue_fast.protect(inputs[0]["image-folder"], tmp_path / "out", method="ops", poison_pt="maybe", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_npy_of_a_budget_over_127_is_int16(inputs, tmp_path):
    data = inputs[1]
    effective = torch.full(data.images.shape, 200, dtype=torch.int16)
    notes = _write(SINKS["npy"](), _context(tmp_path / "out", data, eps=255), data, effective, 10)
    assert list(notes) == ["perturbation_int16.npy"]
    saved = np.load(tmp_path / "out" / "perturbation_int16.npy")
    assert saved.dtype == np.int16 and (saved == 200).all()
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


def test_evaluate_reads_through_the_same_sources(inputs):
    given, data = inputs
    for name in ("image-folder", "distribution"):
        got = read_dataset(given[name])
        assert torch.equal(got.images, data.images) and torch.equal(got.labels, data.labels)
