"""Training-free poisons (``ue_fast.methods.training_free``: ops, lsp, ar) on real demo images, on
the CPU: the patterns each paper describes. The contract (budget, determinism, resume) is in
``test_methods_contract.py``."""
import json
from pathlib import Path

import pytest
import torch

import ue_fast
from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.data.exports import load_delta_npy
from ue_fast.methods.training_free import _OFFSETS, ar_process, ops_search

QUIET = dict(progress=False, device="cpu")


def _subset(dst: Path, classes=("airplane", "cat", "ship", "truck"), per_class=15) -> Path:
    return demo_subset(dst, classes, per_class)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _subset(tmp_path_factory.mktemp("tf") / "in")


def _outputs(out: Path):
    m = json.loads((out / "manifest.json").read_text())
    return m, load_delta_npy(out / m["perturbation_npy"]).to(torch.int16)


@pytest.mark.parametrize("method", ["lsp", "ar"])
def test_classwise_patterned(src, tmp_path, method):
    m, d = _outputs(Path(ue_fast.protect(src, tmp_path / "a", method=method, **QUIET)["output"]))
    labels = torch.tensor([f["label"] for f in m["files"]])
    pred = _ar_residual_classes(d, labels) if method == "ar" else _nearest_mean_classes(d, labels)
    assert float((pred == labels).float().mean()) > 0.9, "the perturbations carry no class-wise pattern"


def _nearest_mean_classes(d, labels):
    """LSP draws one cluster per class: the class means of the perturbations separate them."""
    x = d.flatten(1).float()
    means = torch.stack([x[labels == k].mean(0) for k in range(int(labels.max()) + 1)])
    return torch.cdist(x, means).argmin(1)


def _ar_residual_classes(d, labels):
    """AR draws one process per class: fit each class's 8 causal weights per channel by least squares on
    half of its images, then give every image the class whose process predicts it best."""
    x = d.double()  # [N, 3, H, W]
    n, c, h, w = x.shape
    target = x[:, :, 2:, 2:].reshape(n, c, -1)  # [N, 3, P]
    feats = torch.stack([x[:, :, 2 + di:h + di, 2 + dj:w + dj].reshape(n, c, -1) for di, dj in _OFFSETS], -1)
    resid = []
    for k in range(int(labels.max()) + 1):
        fit = torch.nonzero(labels == k).flatten()[::2]
        a = feats[fit].permute(1, 0, 2, 3).reshape(c, -1, 8)  # [3, n_fit * P, 8]
        b = target[fit].permute(1, 0, 2).reshape(c, -1, 1)
        wk = torch.linalg.lstsq(a, b).solution  # [3, 8, 1]
        resid.append((target - (feats @ wk[None]).squeeze(-1)).square().sum((1, 2)))
    return torch.stack(resid, 1).argmin(1)


def test_lsp_is_patchwise_constant_with_paper_norm(src, tmp_path):
    ue_fast.protect(src, tmp_path / "o", method="lsp", eps=32, **QUIET)  # a budget the pattern does not reach
    _, d = _outputs(tmp_path / "o")
    clean = read_image_folder(src, progress=False).images.to(torch.int16)
    # where no pixel clip happened, every 8x8 patch carries one colour per channel
    free = ((clean + d) > 0) & ((clean + d) < 255)
    patches = d.float().unfold(2, 8, 8).unfold(3, 8, 8)  # [N, 3, 4, 4, 8, 8]
    ok = free.unfold(2, 8, 8).unfold(3, 8, 8).all(-1).all(-1)
    spread = patches.amax((-1, -2)) - patches.amin((-1, -2))
    assert int(spread[ok].max()) <= 1  # 1/255: rounding to 8 bits
    rms = float(d.float().square().mean().sqrt())
    assert 5.0 < rms < 7.0, rms  # L2 = 6/255 * sqrt(3HW), i.e. an RMS of 6/255


def test_ar_recurrence_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, 8, generator=g, dtype=torch.float64) / 4
    got = ar_process(w, start)
    ref = start.clone()
    for i in range(2, 9):
        for j in range(2, 11):
            ref[:, :, i, j] = sum(w[:, :, k] * ref[:, :, i + di, j + dj] for k, (di, dj) in enumerate(_OFFSETS))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, :, :2], start[:, :, :2]) and torch.equal(got[:, :, :, :2], start[:, :, :, :2])


def test_ops_changes_one_pixel_per_image_to_the_searched_colour(src, tmp_path):
    m = ue_fast.protect(src, tmp_path / "o", method="ops", **QUIET)
    assert m["settings"]["eps_255"] == 255 and m["perturbation_npy"] == "perturbation_int16.npy"
    clean = read_image_folder(src, progress=False)
    prot = read_image_folder(tmp_path / "o", progress=False).images
    changed = (prot != clean.images).any(1).flatten(1)  # [N, HW]
    assert int(changed.sum(1).max()) <= 1  # one pixel (none if it already had the colour)
    pos, col = ops_search(clean.images, clean.labels, 4)
    for k in range(4):
        sel = clean.labels == k
        p = int(pos[k, 0])
        v = prot[sel].flatten(2)[:, :, p]  # [n_k, 3]
        assert torch.equal(v, (col[k, 0] * 255).to(torch.uint8).expand_as(v))
    assert len({(int(pos[k, 0]), tuple(col[k, 0].tolist())) for k in range(4)}) == 4


def test_ops_search_objective_against_brute_force():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (12, 3, 5, 4), generator=g, dtype=torch.uint8)
    labels = torch.arange(12) % 2
    pos, col = ops_search(images, labels, 2)
    x = images.flatten(2).double() / 255
    best = None
    for p in range(20):
        for v in range(8):
            c = torch.tensor([(v >> 2) & 1, (v >> 1) & 1, v & 1], dtype=torch.float64)
            a = (c[None, :] - x[labels == 0][:, :, p]).abs()
            score = float(a.mean() / a.std(unbiased=False))
            if best is None or score > best[0]:
                best = (score, p, c)
    assert int(pos[0, 0]) == best[1] and torch.equal(col[0, 0].double(), best[2])


def test_bad_settings(src, tmp_path):
    with pytest.raises(ValueError, match="sparse"):
        ue_fast.protect(src, tmp_path / "x", method="ar", sparse=5, **QUIET)
    with pytest.raises(ValueError, match="patch"):
        ue_fast.protect(src, tmp_path / "y", method="lsp", patch=0, **QUIET)
    with pytest.raises(ValueError, match="no setting"):  # no surrogate settings
        ue_fast.protect(src, tmp_path / "z", method="ops", arch="resnet18", **QUIET)


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("method", ["ops", "lsp", "ar"])
def test_chunks_give_one_call_bit_for_bit(src, tmp_path, monkeypatch, method, store):
    """Generation runs by chunks of 16 rows (here; about 4 M noise values in a run), reading
    the images from memory or disk: the result is that of one call on the whole set, bit for
    bit, with a short last chunk (53 images: 16 + 16 + 16 + 5)."""
    from ue_fast.generation import Runner
    from ue_fast.methods import METHODS
    from ue_fast.methods.base import TrainingFreeMethod

    data = read_image_folder(src, progress=False)
    images, labels = data.images[:53], data.labels[:53]
    cls = METHODS[method]
    whole = cls(cls.config_class(), 4).generate(images, labels, torch.Generator().manual_seed(cls.config_class().seed),
                                                torch.device("cpu")).clamp(-cls.config_class().eps,
                                                                           cls.config_class().eps)
    monkeypatch.setattr(TrainingFreeMethod, "chunk", lambda self: 16)
    calls = []
    rows = cls.rows
    monkeypatch.setattr(cls, "rows", lambda self, x, *a: calls.append(len(x)) or rows(self, x, *a))
    r = Runner(cls(), images, labels, 4, "cpu", progress=False, store=store, work_dir=tmp_path)
    assert r.method.data.on_disk == (store == "disk")
    res = r.run()
    assert calls == [16, 16, 16, 5]
    assert torch.equal(res.read(0, 53), whole.float()) and float(whole.abs().max()) > 0
