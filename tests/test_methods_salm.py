"""SALM's sparse wrapper (``ue_fast.methods.salm``); the mask is tested in
``test_generation_saliency.py``."""
import pytest

import ue_fast
from _helpers import demo_subset
from ue_fast.data.exports import load_delta_npy
from ue_fast.methods import EM, MIUE, OPS, Sparse, EMClasswise

FAST = dict(arch="cnn-small", epochs=2, pgd_steps=2, batch_size=16, poison_batch_size=32, progress=False,
            device="cpu")


def test_sparse_perturbs_only_the_most_salient_pixels(tmp_path):
    """--sparse K: at most K% of each image's pixels differ from the input, and they do move."""
    src = demo_subset(tmp_path / "in", per_class=6)
    m = ue_fast.protect(src, tmp_path / "o", sparse=10, **FAST)
    assert m["settings"]["sparse"] == 10
    d = load_delta_npy(tmp_path / "o" / "perturbation_int8.npy")  # [N, 3, H, W]
    moved = (d != 0).any(dim=1).flatten(1).float().mean(1)  # fraction of pixels moved, per image
    assert float(moved.max()) <= 0.10 + 1e-6
    assert float(moved.mean()) > 0.02, "the salient pixels should be perturbed"
    for name in ("em", "rem"):  # any per-sample surrogate method
        m = ue_fast.protect(src, tmp_path / name, method=name, sparse=5, **dict(FAST, epochs=1))
        d = load_delta_npy(tmp_path / name / "perturbation_int8.npy")
        assert float((d != 0).any(dim=1).flatten(1).float().mean(1).max()) <= 0.05 + 1e-6
    with pytest.raises(ValueError, match="sparse"):
        ue_fast.protect(src, tmp_path / "bad", sparse=0, **FAST)
    with pytest.raises(ValueError, match="no setting"):
        ue_fast.protect(src, tmp_path / "bad2", temprature=0.5, **FAST)


def test_sparse_refuses_class_wise_and_training_free_methods():
    with pytest.raises(ValueError, match="is class-wise"):
        Sparse(EMClasswise(), 5)
    with pytest.raises(ValueError, match="is training-free"):
        Sparse(OPS(), 5)
    s = Sparse(EM(), 5)
    assert s.name == "em" and s.settings()["sparse"] == 5 and Sparse(MIUE(), 100).percent == 100


def test_sparse_resumes_with_its_mask(tmp_path, monkeypatch):
    from _helpers import protect_killed_after_checkpoint

    src = demo_subset(tmp_path / "in", per_class=4)
    ue_fast.protect(src, tmp_path / "whole", sparse=10, **FAST)
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=1, sparse=10, **FAST)
    ue_fast.protect(src, tmp_path / "split", resume=True, sparse=10, **FAST)
    assert (tmp_path / "whole" / "poison.pt").read_bytes() == (tmp_path / "split" / "poison.pt").read_bytes()
    with pytest.raises(ValueError, match="sparse"):  # another sparsity is another run
        protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "other", die_at=1, sparse=10, **FAST)
        ue_fast.protect(src, tmp_path / "other", resume=True, sparse=20, **FAST)
