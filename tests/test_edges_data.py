"""Edge cases of the data layer: every format Pillow reads, nothing under the input dropped
without a word (``ImageSet.ignored``), transparency kept apart and written back, file names
that are not UTF-8, dangling links and other unreadable files, labels that are not integers."""
import json
import os
import pickle
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import ue_fast.data.decode as decode
import ue_fast.data.folders as folders
import ue_fast.data.png as png
import ue_fast.data.ingest as ingest
import ue_fast.data.scan as scan
from ue_fast.data import (
    ImageSet,
    describe_left_out,
    display_path,
    images_from_arrays,
    read_image_folder,
    read_json,
    write_image_folder,
    write_json_atomic,
)
from ue_fast.data.canonical import load_dataset
from ue_fast.data.folders import output_paths
from ue_fast.data.ingest import ingest_folder
from ue_fast.data.scan import (
    list_image_folder,
    ordered_listing,
    read_order,
    scan_image_folder,
)


def rand_u8(seed, *shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(root, rel, img, **kw):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    img.save(p, **kw)
    return p


def read(root, **kw) -> ImageSet:
    return read_image_folder(root, progress=False, **kw)


def ing(root, work, **kw) -> ImageSet:
    return ingest_folder(root, work, progress=False, **kw)


def px(s: ImageSet, rel: str) -> np.ndarray:
    return s.images[s.paths.index(rel)].permute(1, 2, 0).numpy()


def by_path(ignored) -> dict:
    return {d["path"]: d for d in ignored}


def png_rgba(path) -> tuple[str, np.ndarray]:
    with Image.open(path) as im:
        return im.mode, np.asarray(im).copy()


# ----------------------------------------------------------------------------- formats, and what is left out


@pytest.fixture
def mixed(tmp_path):
    """A GIF (3 frames), a TIFF, a PPM and a dark 16-bit PGM in classes, plus what is not read."""
    root = tmp_path / "in"
    frames = [Image.fromarray(rand_u8(i, 6, 5, 3)).quantize(colors=16) for i in range(3)]
    save(root, "a/anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
    tif = rand_u8(10, 6, 5, 3)
    save(root, "a/photo.tif", Image.fromarray(tif))
    ppm = rand_u8(11, 6, 5, 3)
    save(root, "b/x.ppm", Image.fromarray(ppm))
    dark = (np.arange(30, dtype=np.uint16).reshape(6, 5) * 8 * 257)  # 16-bit, every value <= 255 * 257
    (root / "b" / "deep.pgm").write_bytes(b"P5\n5 6\n65535\n" + dark.astype(">u2").tobytes())
    save(root, "loose.png", Image.fromarray(rand_u8(12, 6, 5, 3)))  # in the root: no class
    (root / "b" / ".DS_Store").write_bytes(b"\0\0")
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    save(root, "a/.ipynb_checkpoints/copy.png", Image.fromarray(tif))
    (root / "a" / "noext").write_bytes(b"x")
    return root, {"tif": tif, "ppm": ppm, "dark": dark, "gif": frames[0].convert("RGB")}


def test_every_pillow_format_read_and_the_rest_listed(mixed, tmp_path):
    root, src = mixed
    s = read(root)
    assert s.paths == ["a/anim.gif", "a/photo.tif", "b/deep.pgm", "b/x.ppm"]
    np.testing.assert_array_equal(px(s, "a/photo.tif"), src["tif"])
    np.testing.assert_array_equal(px(s, "b/x.ppm"), src["ppm"])
    np.testing.assert_array_equal(px(s, "a/anim.gif"), np.asarray(src["gif"]))  # the first frame
    # a dark 16-bit image is scaled by 1/257, not read as if it were 8-bit
    np.testing.assert_array_equal(px(s, "b/deep.pgm")[..., 0], np.rint(src["dark"] / 257).astype(np.uint8))
    assert s.alpha is None and s.skipped == []

    ig = by_path(s.ignored)
    assert set(ig) == {"a/.ipynb_checkpoints", "a/anim.gif", "a/noext", "b/.DS_Store", "b/features.h5",
                       "b/notes.txt", "loose.png"}
    assert ig["loose.png"]["reason"] == "not in a class folder (lies in the root)"
    assert ig["b/.DS_Store"]["reason"] == "hidden file"
    assert ig["a/.ipynb_checkpoints"]["reason"].startswith("hidden folder")
    assert ig["b/notes.txt"]["reason"] == "not an image Pillow can open (.txt)"
    assert ig["a/noext"]["reason"] == "not an image Pillow can open (no extension)"
    assert "HDF5" in ig["b/features.h5"]["reason"] and ig["b/features.h5"]["kind"] == "no decoder"
    assert ig["a/anim.gif"]["kind"] == "frames" and ig["a/anim.gif"]["frames"] == 3
    assert "first of its 3 frames" in ig["a/anim.gif"]["reason"]
    assert [d["path"] for d in s.ignored] == sorted(ig)
    assert all(d["kind"] in scan.IGNORED_KINDS for d in s.ignored)

    line = describe_left_out(s.ignored, s.skipped)
    assert line.startswith("6 files and folders not protected: 1 hidden file, 1 hidden folder, "
                           "1 not in a class folder (lying in the root), 2 not images Pillow can open "
                           "(.txt, no extension), 1 in a format Pillow cannot decode (.h5)")
    assert "1 multi-frame image: only its first frame protected" in line and "manifest.json 'ignored'" in line
    assert describe_left_out([], []) is None
    assert describe_left_out([], [{"path": "a/x.png", "reason": "bad"}]) == (
        "1 file not protected: 1 unreadable image skipped (--skip-bad) (see manifest.json 'skipped')")

    # the listing functions keep their signatures; the new one adds what was not read
    classes, files = scan_image_folder(root)
    assert classes == ["a", "b"] and [r for f in files for r in f] == s.paths
    assert ordered_listing(root)[1] == s.paths
    assert [d["path"] for d in list_image_folder(root).ignored] == sorted(set(ig) - {"a/anim.gif"})

    # ingest reports the same, and a reused ingest too (images.json carries it)
    for workers in (1, 2):
        stats = {}
        g = ing(root, tmp_path / f"w{workers}", workers=workers, stats=stats)
        assert g.ignored == s.ignored and torch.equal(g.images, s.images) and g.alpha is None
        assert not (tmp_path / f"w{workers}" / "alpha.npy").exists()
        again = ing(root, tmp_path / f"w{workers}", stats=stats)
        assert stats["reused"] and again.ignored == s.ignored
    # a new file next to the images is a change: not reused with a stale report
    (root / "b" / "more.csv").write_text("1,2")
    stats = {}
    g = ing(root, tmp_path / "w1", stats=stats)
    assert not stats["reused"] and "b/more.csv" in by_path(g.ignored)


def test_empty_class_and_loose_images_explained(tmp_path):
    root = tmp_path / "in"
    save(root, "a/x.png", Image.fromarray(rand_u8(0, 4, 4, 3)))
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"without images.*b.*readme.txt.*not an image Pillow can open"):
        read(root)
    loose = tmp_path / "loose"
    save(loose, "x.tif", Image.fromarray(rand_u8(0, 4, 4, 3)))
    with pytest.raises(ValueError, match="1 images lie directly in it"):
        read(loose)


# ----------------------------------------------------------------------------- transparency


def alpha_tree(root):
    rgb = rand_u8(1, 6, 5, 3)
    a = np.full((6, 5), 128, np.uint8)
    a[0, 0] = 0
    save(root, "a/rgba.png", Image.fromarray(np.dstack([rgb, a])))
    la_l, la_a = rand_u8(2, 6, 5), rand_u8(3, 6, 5)
    save(root, "a/la.png", Image.fromarray(np.dstack([la_l, la_a]), mode="LA"))
    opaque = rand_u8(4, 6, 5, 3)
    save(root, "b/opaque.png", Image.fromarray(opaque))
    full = np.dstack([rand_u8(5, 6, 5, 3), np.full((6, 5), 255, np.uint8)])
    save(root, "b/rgba_opaque.png", Image.fromarray(full))  # RGBA, but nothing transparent
    pal = Image.fromarray(rand_u8(6, 6, 5, 3)).quantize(colors=8)
    save(root, "b/pal.png", pal, transparency=0)  # palette index 0 transparent
    return {"rgb": rgb, "a": a, "la_l": la_l, "la_a": la_a, "opaque": opaque, "full": full, "pal": pal}


def test_alpha_kept_apart_and_written_back(tmp_path):
    root = tmp_path / "in"
    src = alpha_tree(root)
    s = read(root)
    assert s.paths == ["a/la.png", "a/rgba.png", "b/opaque.png", "b/pal.png", "b/rgba_opaque.png"]
    # colours exactly as stored: not darkened by compositing onto black
    np.testing.assert_array_equal(px(s, "a/rgba.png"), src["rgb"])
    np.testing.assert_array_equal(px(s, "a/la.png"), np.repeat(src["la_l"][..., None], 3, axis=2))
    np.testing.assert_array_equal(px(s, "b/pal.png"), np.asarray(src["pal"].convert("RGB")))
    assert s.alpha is not None and s.alpha.dtype == torch.uint8 and s.alpha.shape == (5, 6, 5)
    al = {p: s.alpha[i].numpy() for i, p in enumerate(s.paths)}
    np.testing.assert_array_equal(al["a/rgba.png"], src["a"])
    np.testing.assert_array_equal(al["a/la.png"], src["la_a"])
    np.testing.assert_array_equal(al["b/pal.png"], np.where(np.asarray(src["pal"]) == 0, 0, 255))
    assert (al["b/opaque.png"] == 255).all() and (al["b/rgba_opaque.png"] == 255).all()

    out = tmp_path / "out"
    new = s.images.clone()
    new[:, 0] ^= 1  # a perturbation of the colours
    written = write_image_folder(out, new, s.paths, alpha=s.alpha)
    for i, o in enumerate(written):
        mode, arr = png_rgba(out / o)
        if o in ("a/rgba.png", "a/la.png", "b/pal.png"):
            assert mode == "RGBA"
            np.testing.assert_array_equal(arr[..., 3], s.alpha[i].numpy())
            np.testing.assert_array_equal(arr[..., :3], new[i].permute(1, 2, 0).numpy())
        else:
            assert mode == "RGB"
            np.testing.assert_array_equal(arr, new[i].permute(1, 2, 0).numpy())
    back = read(out)  # the protected copy reads back with the same alpha
    assert torch.equal(back.alpha, s.alpha) and torch.equal(back.images, new)
    # without alpha (e.g. a caller not passing it) everything is RGB, as before
    write_image_folder(tmp_path / "rgb", new, s.paths)
    assert png_rgba(tmp_path / "rgb" / "a/rgba.png")[0] == "RGB"
    with pytest.raises(ValueError, match="alpha"):
        write_image_folder(tmp_path / "bad", new, s.paths, alpha=s.alpha[:, :2])


def test_alpha_through_ingest_resize_and_skip(tmp_path, monkeypatch):
    root = tmp_path / "in"
    alpha_tree(root)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG nope")
    ref = read(root, skip_bad=True)
    monkeypatch.setattr(ingest, "CHUNK", 2)  # several tasks, so the worker processes write alpha rows
    for workers in (1, 3):
        w = tmp_path / f"w{workers}"
        g = ing(root, w, workers=workers, skip_bad=True)
        assert g.paths == ref.paths and torch.equal(g.images, ref.images)
        assert g.alpha is not None and torch.equal(g.alpha, ref.alpha)
        assert np.load(w / "alpha.npy", mmap_mode="r").shape == (5, 6, 5)
        assert read_json(w / "images.json")["alpha"] is True
        stats = {}
        again = ing(root, w, skip_bad=True, stats=stats)
        assert stats["reused"] and torch.equal(again.alpha, ref.alpha)
        assert [d["path"] for d in again.skipped] == ["b/broken.png"]
    # resize: alpha resized with the same filter
    r = read(root, resize=(12, 10), skip_bad=True)
    assert r.alpha.shape == (5, 12, 10)
    i = r.paths.index("a/rgba.png")
    a = Image.fromarray(ref.alpha[ref.paths.index("a/rgba.png")].numpy())
    np.testing.assert_array_equal(r.alpha[i].numpy(), np.asarray(a.resize((10, 12), decode.RESIZE_FILTER)))
    assert (r.alpha[r.paths.index("b/opaque.png")] == 255).all()
    g = ing(root, tmp_path / "wr", resize=(12, 10), skip_bad=True, workers=2)
    assert torch.equal(g.alpha, r.alpha)


def test_image_set_alpha_checked():
    x = images_from_arrays(rand_u8(0, 2, 4, 3, 3), np.array([0, 1]))
    assert x.alpha is None and x.ignored == []
    with pytest.raises(ValueError, match="alpha"):
        ImageSet(x.images, x.labels, x.classes, x.paths, alpha=torch.zeros(2, 4, 4, dtype=torch.uint8))


# ----------------------------------------------------------------------------- file names


def test_name_not_utf8_read_written_and_round_tripped(tmp_path):
    root = tmp_path / "in"
    save(root, "a/ok.png", Image.fromarray(rand_u8(0, 4, 4, 3)))
    os.makedirs(os.fsencode(root / "b"), exist_ok=True)
    bad = os.fsencode(root) + b"/b/\xff\xfe.png"
    with open(bad, "wb") as f:
        Image.fromarray(rand_u8(1, 4, 4, 3)).save(f, format="PNG")
    name = "b/" + os.fsdecode(b"\xff\xfe.png")
    s = read(root)
    assert s.paths == ["a/ok.png", name]
    np.testing.assert_array_equal(px(s, name), rand_u8(1, 4, 4, 3))
    out = tmp_path / "out"
    written = write_image_folder(out, s.images, s.paths)
    assert os.path.exists(os.fsencode(out) + b"/b/\xff\xfe.png")  # the name keeps its bytes
    assert torch.equal(read(out).images, s.images)

    write_json_atomic(tmp_path / "m.json", {"paths": s.paths, "written": written, "ünï": "ünï"})
    raw = (tmp_path / "m.json").read_bytes()
    raw.decode("utf-8")  # valid UTF-8: the odd bytes are escaped, other text stays readable
    assert b"\\udcff\\udcfe.png" in raw and "ünï".encode() in raw
    back = read_json(tmp_path / "m.json")
    assert back["paths"] == s.paths and os.path.exists(root / back["paths"][1])

    # ingest: the signature and images.json take the name
    g = ing(root, tmp_path / "w")
    assert g.paths == s.paths
    stats = {}
    assert ing(root, tmp_path / "w", stats=stats).paths == s.paths and stats["reused"]
    # an order file naming it (as `find` would write it) reads back the same name
    (tmp_path / "order.txt").write_bytes(b"\xef\xbb\xbfb/\xff\xfe.png\r\na/ok.png\r\n")
    assert read_order(tmp_path / "order.txt") == [name, "a/ok.png"]
    assert read(root, order=tmp_path / "order.txt").paths == [name, "a/ok.png"]


def test_unreadable_name_not_utf8_is_named_printably(tmp_path):
    root = tmp_path / "in"
    save(root, "a/ok.png", Image.fromarray(rand_u8(0, 4, 4, 3)))
    save(root, "b/ok.png", Image.fromarray(rand_u8(0, 4, 4, 3)))
    with open(os.fsencode(root) + b"/b/\xff.jpg", "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(ValueError) as e:
        read(root)
    msg = str(e.value)
    msg.encode("ascii", "backslashreplace").decode("ascii")
    msg.encode("utf-8")  # printable anywhere: no lone surrogate in the message
    assert "b/\\xff.jpg" in msg and "--skip-bad" in msg
    s = read(root, skip_bad=True)
    assert [d["path"] for d in s.skipped] == ["b/" + os.fsdecode(b"\xff.jpg")]
    write_json_atomic(tmp_path / "m.json", {"skipped": s.skipped})
    assert read_json(tmp_path / "m.json")["skipped"] == s.skipped
    with pytest.raises(ValueError) as e:
        ing(root, tmp_path / "w")
    assert "b/\\xff.jpg" in str(e.value)
    assert display_path("a/" + os.fsdecode(b"\xe9t\xe9.png")) == "a/\\xe9t\\xe9.png"
    assert display_path("a/été.png") == "a/été.png"


def test_any_name_bytes_round_trip_through_json(tmp_path):
    rng = np.random.default_rng(0)
    names = [bytes([b]) for b in range(1, 256) if b != ord("/")]  # every single byte
    names += [bytes(rng.integers(1, 256, int(rng.integers(1, 13)), dtype=np.uint8)).replace(b"/", b"x")
              for _ in range(300)]
    # valid UTF-8, and the UTF-8 form of a surrogate (invalid)
    names += ["été".encode(), "日本".encode(), "😀".encode(), b"\xed\xa0\x80"]
    decoded = [os.fsdecode(raw) for raw in names]
    doc = {"paths": [f"cat/{n}" for n in decoded], "keys": {n: i for i, n in enumerate(decoded)}}
    write_json_atomic(tmp_path / "x.json", doc)
    (tmp_path / "x.json").read_bytes().decode("utf-8")  # always valid UTF-8
    back = read_json(tmp_path / "x.json")
    assert back == doc
    assert [os.fsencode(p) for p in back["paths"]] == [b"cat/" + raw for raw in names]


# ----------------------------------------------------------------------------- unreadable files


def unreadable_tree(tmp_path):
    root = tmp_path / "in"
    save(root, "a/ok.png", Image.fromarray(rand_u8(0, 4, 4, 3)))
    save(root, "b/ok.png", Image.fromarray(rand_u8(1, 4, 4, 3)))
    os.symlink(tmp_path / "gone.png", root / "a" / "dangling.png")
    (root / "b" / "empty.jpg").write_bytes(b"")
    return root


def test_dangling_link_and_empty_file_skipped_or_named(tmp_path):
    root = unreadable_tree(tmp_path)
    with pytest.raises(ValueError, match=r"cannot read image .*a/dangling.png.*dangling.*--skip-bad"):
        read(root)
    s = read(root, skip_bad=True)
    assert s.paths == ["a/ok.png", "b/ok.png"]
    sk = by_path(s.skipped)
    assert set(sk) == {"a/dangling.png", "b/empty.jpg"} and "dangling" in sk["a/dangling.png"]["reason"]
    with pytest.raises(ValueError, match=r"a/dangling.png.*--skip-bad"):
        ing(root, tmp_path / "w")  # the signature's stat does not crash on the link
    g = ing(root, tmp_path / "w", skip_bad=True, workers=2)
    assert g.paths == s.paths and g.skipped == s.skipped
    assert describe_left_out(g.ignored, g.skipped).startswith("2 files not protected: 2 unreadable images skipped")


def test_fifo_permission_and_folder_named_like_an_image(tmp_path):
    root = unreadable_tree(tmp_path)
    (root / "a" / "dangling.png").unlink()
    (root / "b" / "empty.jpg").unlink()
    os.mkfifo(root / "a" / "pipe.png")  # would block Pillow forever if opened
    with pytest.raises(ValueError, match=r"a/pipe.png.*FIFO"):
        read(root)
    assert read(root, skip_bad=True).skipped[0]["path"] == "a/pipe.png"
    (root / "a" / "pipe.png").unlink()
    # a folder named like an image is a folder: its images are read
    save(root, "a/dir.png/inner.png", Image.fromarray(rand_u8(2, 4, 4, 3)))
    assert read(root).paths == ["a/dir.png/inner.png", "a/ok.png", "b/ok.png"]
    if os.geteuid() != 0:  # root reads anything
        p = root / "b" / "locked.png"
        save(root, "b/locked.png", Image.fromarray(rand_u8(3, 4, 4, 3)))
        p.chmod(0)
        try:
            with pytest.raises(ValueError, match=r"b/locked.png.*Permission"):
                read(root)
            assert [d["path"] for d in read(root, skip_bad=True).skipped] == ["b/locked.png"]
        finally:
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_symlinked_folders_followed_and_loops_listed(tmp_path):
    outside = tmp_path / "elsewhere"
    save(outside, "x.png", Image.fromarray(rand_u8(0, 4, 4, 3)))
    root = tmp_path / "in"
    save(root, "a/ok.png", Image.fromarray(rand_u8(1, 4, 4, 3)))
    root.joinpath("b").symlink_to(outside, target_is_directory=True)  # a class assembled by a link
    (root / "a" / "sub").mkdir()
    (root / "a" / "sub" / "up").symlink_to(root / "a", target_is_directory=True)  # a loop
    s = read(root)
    assert s.paths == ["a/ok.png", "b/x.png"]
    assert by_path(s.ignored)["a/sub/up"]["kind"] == "link loop"


def test_decompression_bomb_refused_and_named(tmp_path, monkeypatch):
    root = tmp_path / "in"
    save(root, "a/ok.png", Image.fromarray(rand_u8(0, 4, 4, 3)))
    save(root, "b/huge.png", Image.fromarray(rand_u8(1, 40, 40, 3)))
    save(root, "b/ok.png", Image.fromarray(rand_u8(2, 4, 4, 3)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 > 2x: Pillow's DecompressionBombError
    with pytest.raises(ValueError, match=r"b/huge.png.*DecompressionBomb.*--skip-bad"):
        read(root, resize=4)
    assert [d["path"] for d in read(root, resize=4, skip_bad=True).skipped] == ["b/huge.png"]


def test_wide_and_float_images(tmp_path):
    root = tmp_path / "in"
    g16 = (rand_u8(0, 4, 4).astype(np.uint16) * 257)
    save(root, "a/g16.tif", Image.fromarray(g16))
    f = rand_u8(1, 4, 4).astype(np.float32) / 255
    save(root, "a/f.tif", Image.fromarray(f))
    cmyk = Image.fromarray(rand_u8(2, 4, 4, 3)).convert("CMYK")
    save(root, "b/cmyk.tif", cmyk)
    s = read(root)
    np.testing.assert_array_equal(px(s, "a/g16.tif")[..., 0], rand_u8(0, 4, 4))
    np.testing.assert_array_equal(px(s, "a/f.tif")[..., 0], rand_u8(1, 4, 4))
    np.testing.assert_array_equal(px(s, "b/cmyk.tif"), np.asarray(cmyk.convert("RGB")))
    save(root, "b/hdr.tif", Image.fromarray(np.full((4, 4), 3.5, np.float32)))
    with pytest.raises(ValueError, match=r"b/hdr.tif.*floating-point.*\[3.5, 3.5\]"):
        read(root)


# ----------------------------------------------------------------------------- output names


def test_case_only_collisions_refused_on_case_insensitive_file_systems(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    paths = ["cat/A.jpg", "cat/a.png", "Dog/x.png", "dog/y.png"]
    assert folders.case_insensitive(out) in (False, True)  # the probe works and leaves nothing
    assert list(out.iterdir()) == []
    monkeypatch.setattr(png, "case_insensitive", lambda folder: False)
    assert output_paths(paths, out) == ["cat/A.png", "cat/a.png", "Dog/x.png", "dog/y.png"]
    monkeypatch.setattr(png, "case_insensitive", lambda folder: True)
    assert output_paths(paths) == ["cat/A.png", "cat/a.png", "Dog/x.png", "dog/y.png"]  # no folder: not probed
    with pytest.raises(ValueError, match=r"'cat/A.jpg' and 'cat/a.png'.*ignores case"):
        output_paths(paths, out)
    imgs = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="ignores case"):
        write_image_folder(out, imgs, ["cat/A.jpg", "cat/a.png"])
    assert list(out.iterdir()) == []  # refused before anything is written
    with pytest.raises(ValueError, match="ignores case"):
        write_image_folder(tmp_path / "new", imgs, ["cat/A.jpg", "cat/a.png"])
    assert not (tmp_path / "new").exists()
    e = "e\u0301"  # NFD: macOS treats it as the NFC "é"
    with pytest.raises(ValueError, match="ignores case"):
        output_paths([f"c/{e}.png", "c/\u00e9.png"], out)


# ----------------------------------------------------------------------------- labels of the data sets


def write_cifar(d, labels, names=("a", "b", "c", "d")):
    d.mkdir(parents=True, exist_ok=True)
    data = rand_u8(0, len(labels), 3072)
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f, protocol=2)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(names)}, f, protocol=2)
    return d


def test_float_labels_refused_not_truncated(tmp_path):
    d = write_cifar(tmp_path / "c1" / "cifar-10-batches-py", [0, 1, 3.7, 2])
    with pytest.raises(ValueError, match=r"data_batch_1.*'labels'.*not whole numbers.*3\.7"):
        load_dataset(d)
    d = write_cifar(tmp_path / "c2" / "cifar-10-batches-py", np.array([0.0, 1.0, 3.0, 2.0]))
    assert load_dataset(d).labels.tolist() == [0, 1, 3, 2] * 5  # whole floats are fine
    d = write_cifar(tmp_path / "c3" / "cifar-10-batches-py", [0, 1, float("nan"), 2])
    with pytest.raises(ValueError, match="nan"):
        load_dataset(d)
    d = write_cifar(tmp_path / "c4" / "cifar-10-batches-py", [0, 1, 2, 3], names=(b"cat", b"dog", b"ox", b"yak"))
    assert load_dataset(d).classes == ["cat", "dog", "ox", "yak"]  # bytes names decoded, not "b'cat'"

    x = rand_u8(0, 4, 4, 4, 3)
    np.savez(tmp_path / "f.npz", x=x, y=np.array([0, 1, 2.5, 1]))
    with pytest.raises(ValueError, match=r"f.npz.*'y'.*not whole numbers.*2\.5"):
        load_dataset(tmp_path / "f.npz")
    np.savez(tmp_path / "w.npz", x=x, y=np.array([0.0, 1.0, 2.0, 1.0]), classes=np.array([b"p", b"q", b"r"]))
    s = load_dataset(tmp_path / "w.npz")
    assert s.labels.tolist() == [0, 1, 2, 1] and s.classes == ["p", "q", "r"]
    np.savez(tmp_path / "b.npz", x=x, y=np.array([True, False, True, False]))
    with pytest.raises(ValueError, match=r"b.npz.*integer class labels.*bool"):
        load_dataset(tmp_path / "b.npz")
    np.savez(tmp_path / "r.npz", x=x, y=np.array([0, 1, 2, 9]), classes=np.array(["p", "q", "r"]))
    with pytest.raises(ValueError, match=r"r.npz.*\[0, 3\).*9"):  # out of range: names the file
        load_dataset(tmp_path / "r.npz")
    with pytest.raises(TypeError, match="integers"):  # the array API still refuses floats
        images_from_arrays(x, np.array([0.0, 1.0, 2.0, 1.0]))


def test_svhn_labels_as_doubles(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    x = rand_u8(0, 32, 32, 3, 4)
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[10.0], [1.0], [2.0], [10.0]])})
    assert load_dataset(tmp_path / "train_32x32.mat").labels.tolist() == [0, 1, 2, 0]
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10.0], [1.5], [2.0], [10.0]])})
    with pytest.raises(ValueError, match=r"test_32x32.mat.*'y'.*1\.5"):
        load_dataset(tmp_path / "test_32x32.mat")


def test_json_written_is_valid_utf8_json(tmp_path):
    obj = {"p": "a/" + os.fsdecode(b"\x80.png"), "q": "日本"}
    write_json_atomic(tmp_path / "x.json", obj)
    text = (tmp_path / "x.json").read_bytes().decode("utf-8")
    assert json.loads(text) == obj and "日本" in text
