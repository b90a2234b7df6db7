"""benchmarks/bench_scale.py's inputs: the same images as a folder, WebDataset shards, a Parquet
file and an LMDB environment, each read back in the folder's order (what its rows compare)."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from ue_fast.data import demo_dir, read_dataset, read_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("layout", ["webdataset", "parquet", "lmdb"])
def test_every_layout_holds_the_folders_images_in_its_order(tmp_path, layout):
    pytest.importorskip({"webdataset": "webdataset", "parquet": "pyarrow", "lmdb": "lmdb"}[layout])
    folder = tmp_path / "in"
    for d in sorted(p for p in (demo_dir() / "train").iterdir() if p.is_dir())[:3]:
        (folder / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.jpg"))[:4]:
            shutil.copy(f, folder / d.name / f.name)
    given = _bench().make_layout(folder, layout, tmp_path / layout)
    ref, got = read_image_folder(folder, progress=False), read_dataset(given, "train")
    assert torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels) and len(got) == 12
