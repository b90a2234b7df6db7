"""Ingesting an image folder once, in parallel, into a uint8 .npy reused on resume."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from _helpers import demo_subset
from PIL import Image

from ue_fast.data import read_image_folder
from ue_fast.data.ingest import CHUNK, ingest_folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    # more than two chunks, so the worker processes run
    return demo_subset(tmp_path_factory.mktemp("in"), per_class=2 * CHUNK // 3 + 5)


@pytest.mark.parametrize("workers", [1, 3])
def test_ingest_equals_read_image_folder(tmp_path, src, workers):
    ref = read_image_folder(src, progress=False)
    stats = {}
    got = ingest_folder(src, tmp_path / "w", workers=workers, progress=False, stats=stats)
    assert torch.equal(got.images, ref.images)
    assert got.labels.tolist() == ref.labels.tolist() and got.paths == ref.paths and got.classes == ref.classes
    assert got.file == tmp_path / "w" / "images.npy"
    assert np.array_equal(np.load(got.file), ref.images.numpy())
    assert stats["reused"] is False and stats["workers"] == workers and stats["images"] == len(ref)


def test_ingest_is_reused_until_the_folder_changes(tmp_path, src):
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    ingest_folder(folder, tmp_path / "w", progress=False)
    stats = {}
    again = ingest_folder(folder, tmp_path / "w", progress=False, stats=stats)
    assert stats["reused"] is True
    assert torch.equal(again.images, read_image_folder(folder, progress=False).images)
    # a replaced image (other size and time) is seen
    victim = folder / again.paths[3]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(victim, format="JPEG")
    os.utime(victim, ns=(1, 1))
    fresh = ingest_folder(folder, tmp_path / "w", progress=False, stats=stats)
    assert stats["reused"] is False
    assert torch.equal(fresh.images, read_image_folder(folder, progress=False).images)
    # another resize is another ingest
    small = ingest_folder(folder, tmp_path / "w", resize=16, progress=False, stats=stats)
    assert stats["reused"] is False and small.images.shape[2:] == (16, 16)


def test_ingest_skips_bad_files_and_names_them(tmp_path, src):
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    classes = sorted(p.name for p in folder.iterdir())
    (folder / classes[0] / "!broken.jpg").write_bytes(b"not a jpeg")  # the very first file ("!" < "0")
    (folder / classes[1] / "zzz_broken.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(ValueError, match="!broken.jpg"):
        ingest_folder(folder, tmp_path / "w", progress=False)
    got = ingest_folder(folder, tmp_path / "w2", skip_bad=True, workers=2, progress=False)
    ref = read_image_folder(folder, skip_bad=True, progress=False)
    assert torch.equal(got.images, ref.images) and got.paths == ref.paths
    assert [s["path"] for s in got.skipped] == [s["path"] for s in ref.skipped] == [
        f"{classes[0]}/!broken.jpg", f"{classes[1]}/zzz_broken.png"]
    assert np.load(got.file, mmap_mode="r").shape[0] == len(ref)


def test_ingest_refuses_mixed_sizes_found_by_a_worker(tmp_path, src):
    folder = tmp_path / "src"
    shutil.copytree(src, folder)
    last_class = sorted(p.name for p in folder.iterdir())[-1]
    Image.new("RGB", (40, 30)).save(folder / last_class / "zzz_big.png")
    with pytest.raises(ValueError, match="different sizes.*zzz_big.png"):
        ingest_folder(folder, tmp_path / "w", workers=2, progress=False)
    assert ingest_folder(folder, tmp_path / "w", resize=32, workers=2, progress=False).images.shape[2:] == (32, 32)


def test_bad_workers(tmp_path, src):
    with pytest.raises(ValueError, match="workers"):
        ingest_folder(src, tmp_path / "w", workers=0)
