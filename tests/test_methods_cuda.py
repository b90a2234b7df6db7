"""CUDA (convolution-based unlearnable data sets): the filters, the filtering against a plain
per-image reference, and what ``protect`` does with a method that is not an L_p perturbation
and whose seed is a private key."""
import json

import pytest
import torch
import torch.nn.functional as F

import ue_fast
from _helpers import demo_subset, protect_killed_after_checkpoint
from ue_fast.cli import main as cli_main
from ue_fast.data import read_image_folder
from ue_fast.methods.cuda import CUDAConfig, cuda_filter_images, cuda_filters

QUIET = dict(method="cuda", device="cpu", progress=False)


def _reference(images, filters):
    """Image by image, channel by channel: conv2d with zero padding, / max, floor(255 y)."""
    out = []
    for x, f in zip(images.float() / 255, filters):
        k = f.shape[-1]
        y = torch.stack([F.conv2d(x[c][None, None], f[None, None].float(), padding=k // 2)[0, 0]
                         for c in range(x.shape[0])])
        if y.max() > 0:
            y = y / y.max()
        out.append(torch.floor(y * 255).to(torch.uint8))
    return torch.stack(out)


@pytest.mark.parametrize("pb, k", [(0.3, 3), (0.8, 5), (0.05, 7)])
def test_filters_have_entries_below_pb_and_one_entry_one(pb, k):
    f = cuda_filters(7, k, pb, torch.Generator().manual_seed(3))
    assert f.shape == (7, k, k)
    flat = f.flatten(1)
    assert ((flat == 1.0).sum(1) == 1).all()
    rest = flat.masked_fill(flat == 1.0, 0.0)
    assert (rest >= 0).all() and (rest < pb).all()
    again = cuda_filters(7, k, pb, torch.Generator().manual_seed(3))
    assert torch.equal(f, again)
    assert torch.equal(cuda_filters(3, k, pb, torch.Generator().manual_seed(3)), f[:3])  # a class's own draws
    assert not torch.equal(cuda_filters(7, k, pb, torch.Generator().manual_seed(4)), f)


@pytest.mark.parametrize("shape, k", [((6, 3, 32, 32), 3), ((1, 3, 17, 13), 3), ((4, 3, 8, 8), 5), ((3, 1, 5, 9), 3)])
def test_filtering_matches_the_per_image_reference(shape, k):
    g = torch.Generator().manual_seed(sum(shape) + k)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    images[0] = 0  # an all-black image stays black (no division by zero)
    filters = cuda_filters(shape[0], k, 0.3, g)
    out = cuda_filter_images(images, filters)
    ref = _reference(images, filters)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert int((out.int() - ref.int()).abs().max()) <= 1  # float summation order: a floor may fall either side
    assert (out != ref).float().mean() < 0.01
    assert int(out[0].max()) == 0
    assert all(int(o.max()) == 255 for o in out[1:])  # each image scaled to its own maximum


def test_eps_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="not an L-inf"):
        CUDAConfig(eps=8 / 255)
    with pytest.raises(ValueError, match="odd"):
        CUDAConfig(kernel_size=4)
    with pytest.raises(ValueError, match="blur_parameter"):
        CUDAConfig(blur_parameter=0)
    assert CUDAConfig().seed != CUDAConfig().seed  # a fresh key per run


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("in"), per_class=8)


def test_protected_images_are_the_filtered_images_and_the_key_is_withheld(src, tmp_path):
    m = ue_fast.protect(src, tmp_path / "o", **QUIET, key_file=tmp_path / "key.json")
    key = json.loads((tmp_path / "key.json").read_text())
    clean, prot = read_image_folder(src, progress=False), read_image_folder(tmp_path / "o", progress=False)
    filters = torch.tensor(key["filters"])
    assert filters.shape == (3, 3, 3)
    assert torch.equal(prot.images, cuda_filter_images(clean.images, filters[clean.labels]))
    poison = torch.load(tmp_path / "o" / "poison.pt", weights_only=True)
    assert torch.equal(torch.round(poison * 255).to(torch.int16), prot.images.to(torch.int16) - clean.images)
    assert m["seed"] is None and m["settings"]["seed"] is None and m["key"]["withheld"]
    assert m["budget"]["kind"] == "convolution" and m["budget"]["holds"] is True
    assert m["budget"]["blur_parameter"] == 0.3 and m["linf_max_255"] > 8
    secret = str(key["seed"]).encode()
    for f in (tmp_path / "o").rglob("*"):  # the key is in no output file
        assert not f.is_file() or secret not in f.read_bytes(), f
    assert (tmp_path / "key.json").stat().st_mode & 0o077 == 0  # owner-only
    again = ue_fast.protect(src, tmp_path / "again", **QUIET, seed=key["seed"])  # the key regenerates the output
    assert (tmp_path / "again" / again["perturbation_npy"]).read_bytes() == \
        (tmp_path / "o" / m["perturbation_npy"]).read_bytes()
    other = ue_fast.protect(src, tmp_path / "other", **QUIET)  # no key given: a fresh one
    assert (tmp_path / "other" / other["perturbation_npy"]).read_bytes() != \
        (tmp_path / "o" / m["perturbation_npy"]).read_bytes()


def test_key_file_is_never_replaced_nor_written_into_the_output_and_only_for_keyed_methods(src, tmp_path):
    (tmp_path / "key.json").write_text("an earlier key")
    with pytest.raises(ValueError, match="never replaced"):
        ue_fast.protect(src, tmp_path / "o", **QUIET, key_file=tmp_path / "key.json")
    assert (tmp_path / "key.json").read_text() == "an earlier key"
    with pytest.raises(ValueError, match="outside the output folder"):
        ue_fast.protect(src, tmp_path / "o", **QUIET, key_file=tmp_path / "o" / "key.json")
    with pytest.raises(ValueError, match="no private key"):
        ue_fast.protect(src, tmp_path / "o", method="ops", device="cpu", progress=False, key_file=tmp_path / "k")
    with pytest.raises(ValueError, match="not an L-inf"):
        ue_fast.protect(src, tmp_path / "o", **QUIET, eps=8)
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_keeps_its_drawn_key(src, tmp_path, monkeypatch):
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "o", **QUIET)
    m = ue_fast.protect(src, tmp_path / "o", **QUIET, resume=True, key_file=tmp_path / "key.json")
    seed = json.loads((tmp_path / "key.json").read_text())["seed"]
    ref = ue_fast.protect(src, tmp_path / "ref", **QUIET, seed=seed)
    assert m["resumed_from_epoch"] == 1
    assert (tmp_path / "o" / m["perturbation_npy"]).read_bytes() == \
        (tmp_path / "ref" / ref["perturbation_npy"]).read_bytes()


def test_cli_key_file(src, tmp_path, capsys):
    assert cli_main(["protect", str(src), str(tmp_path / "o"), "--method", "cuda", "--device", "cpu",
                     "--no-progress", "--key-file", str(tmp_path / "k.json"), "--set", "blur_parameter=0.5"]) == 0
    out = capsys.readouterr().out
    assert "not L-inf: convolution" in out and f"key: written to {tmp_path / 'k.json'}" in out
    assert json.loads((tmp_path / "k.json").read_text())["blur_parameter"] == 0.5
