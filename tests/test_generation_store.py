"""The perturbation store (``ue_fast.generation.store``).

MI-UE's steps are 0.2/255 to 0.4/255. A store that rounds to whole grey levels after
every pass resets any net move under 0.5/255; these tests pin down that the default
store keeps such steps, that the int8 option rounds without bias, and that resume
keeps the store's dtype and rounding noise.
"""
import pytest
import torch

import ue_fast
import ue_fast.generation.placement as placement_mod
import ue_fast.methods.base as base_mod
from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.generation import PerturbationStore, Runner
from ue_fast.generation.placement import Placement, check_delta_dtype, choose_store
from ue_fast.methods import MIUE, MIUEConfig

SHORT = dict(arch="cnn-small", epochs=1, pgd_steps=2, batch_size=16, poison_batch_size=64)  # 2 steps of 0.2/255
CPU = torch.device("cpu")


def _runner(data, delta_dtype="auto", **settings):
    return Runner(MIUE(MIUEConfig(**{**SHORT, **settings})), data.images, data.labels, len(data.classes), "cpu",
                  progress=False, delta_dtype=delta_dtype)


def _store(rows=4, dtype=torch.float32, row_of=None, eps=8 / 255):
    return PerturbationStore(rows, (3, 2, 2), device=CPU, place=CPU, dtype=dtype, eps=eps, seed=0, row_of=row_of)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return read_image_folder(demo_subset(tmp_path_factory.mktemp("in"), per_class=8), progress=False)


def test_rows_by_index_and_class_wise_view():
    s = _store()
    s.put(torch.tensor([2, 0]), torch.stack([torch.full((3, 2, 2), 0.01), torch.full((3, 2, 2), -0.02)]))
    assert s.get(torch.tensor([0]))[0, 0, 0, 0] == pytest.approx(-0.02)
    assert s.all()[1].abs().sum() == 0 and s.all().dtype == torch.float32
    got = s.get(torch.tensor([2]))
    got += 1  # a read is a copy
    assert s.get(torch.tensor([2]))[0, 0, 0, 0] == pytest.approx(0.01)
    labels = torch.tensor([2, 2, 0, 1, 2])
    cw = _store(row_of=labels)
    cw.put(torch.tensor([2]), torch.full((1, 3, 2, 2), 0.03))
    assert torch.equal(cw.samples(torch.tensor([0, 3, 4]))[:, 0, 0, 0] > 0, torch.tensor([True, False, True]))
    assert cw.per_sample_cpu().shape == (5, 3, 2, 2)


def test_default_store_keeps_steps_below_half_a_grey_level(data):
    r = _runner(data)
    assert r.method.store.dtype == torch.float32
    d = r.run().delta * 255  # [N, 3, H, W] in grey levels
    assert float(d.abs().max()) <= 0.4 + 1e-4  # two steps of 0.2/255
    moved = d.abs() > 0.1
    assert moved.float().mean() > 0.5, "the sub-grey-level steps were lost"
    assert (d[moved] - d[moved].round()).abs().max() > 0.1  # not on the integer grid


def test_float16_store_follows_float32(data):
    d32 = _runner(data, "float32").run().delta
    r = _runner(data, "float16")
    assert r.method.store.dtype == torch.float16
    d16 = r.run().delta
    # same steps: float16 spacing within 8/255 is at most 0.008/255 (a step's sign may flip where |grad| ~ 0)
    close = (d16 - d32).abs() * 255 <= 0.01
    assert close.float().mean() > 0.99


def test_int8_store_rounds_stochastically_without_bias():
    n = 20_000
    s = _store(rows=n, dtype=torch.int8)
    s.delta = torch.zeros((n, 3, 1, 1), dtype=torch.int8)
    s.begin_pass()
    s.put(torch.arange(n), torch.full((n, 3, 1, 1), 0.3 / 255))  # a net move of 0.3 grey levels
    q = s.delta.float()
    assert set(q.unique().tolist()) == {0.0, 1.0}
    p = float(q.mean())  # binomial: sd = sqrt(0.3 * 0.7 / 60000) ~ 0.0019
    assert abs(p - 0.3) < 0.01, f"rounded up with frequency {p}, expected 0.3"
    # bounds: an integer bound (eps) is never crossed
    s.put(torch.arange(n), torch.full((n, 3, 1, 1), 8 / 255))
    assert int(s.delta.max()) == 8
    s.put(torch.arange(n), torch.full((n, 3, 1, 1), -7.5 / 255))
    assert set(s.delta.unique().tolist()) == {-8, -7}


def test_int8_noise_is_seeded_by_the_pass_number():
    a, b = _store(rows=50, dtype=torch.int8), _store(rows=50, dtype=torch.int8)
    v = torch.full((50, 3, 2, 2), 0.5 / 255)
    for s in (a, b):
        s.begin_pass()
        s.put(torch.arange(50), v)
    assert torch.equal(a.delta, b.delta)
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.begin_pass()  # pass 2 on both, the second after a state round trip
        s.put(torch.arange(50), v)
    assert torch.equal(a.delta, b.delta) and a.passes == b.passes == 2


def test_int8_store_moves_where_round_to_nearest_would_not(data):
    d = _runner(data, "int8").run().delta * 255
    assert torch.equal(d, d.round())  # whole grey levels
    assert (d != 0).float().mean() > 0.1  # 0.4/255 of net move rounds up 40% of the time


def test_int8_resume_draws_the_same_rounding(tmp_path, monkeypatch):
    from _helpers import protect_killed_after_checkpoint

    src = demo_subset(tmp_path / "in", per_class=4)
    settings = dict(SHORT, epochs=3, delta_dtype="int8", progress=False, device="cpu")
    ue_fast.protect(src, tmp_path / "whole", **settings)
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=2, **settings)
    ue_fast.protect(src, tmp_path / "split", resume=True, **settings)
    assert (tmp_path / "whole" / "poison.pt").read_bytes() == (tmp_path / "split" / "poison.pt").read_bytes()


def test_choose_store(monkeypatch):
    monkeypatch.setattr(placement_mod, "_host_available_bytes", lambda: 1e12)
    assert choose_store(CPU, 3000, 3000, "auto") == Placement(CPU, CPU, torch.float32)
    assert choose_store(CPU, 3000, 3000, "int8") == Placement(CPU, CPU, torch.int8)
    # float32 perturbations would not fit half of the memory, float16 ones do
    monkeypatch.setattr(placement_mod, "_host_available_bytes", lambda: 2 * (1000 + 1000 * 3))
    assert choose_store(CPU, 1000, 1000, "auto") == Placement(CPU, CPU, torch.float16)
    # float32 asked for and over the budget: to disk, or kept in memory when memory is forced
    assert choose_store(CPU, 1000, 1000, "float32") == Placement("disk", "disk", torch.float32)
    assert choose_store(CPU, 1000, 1000, "float32", store="memory") == Placement(CPU, CPU, torch.float32)
    # nothing fits: disk, in the faithful float32 (auto) or the dtype asked for
    assert choose_store(CPU, 1000, 1000, "auto", memory_budget=1500) == Placement("disk", "disk", torch.float32)
    assert choose_store(CPU, 1000, 1000, "int8", memory_budget=1500) == Placement("disk", "disk", torch.int8)
    # a class-wise store is a few rows: it stays in memory when the images go to disk
    assert choose_store(CPU, 1000, 10, "auto", memory_budget=500, small_delta=True) == \
        Placement("disk", CPU, torch.float32)
    # forced
    assert choose_store(CPU, 10, 10, "auto", store="disk") == Placement("disk", "disk", torch.float32)
    with pytest.raises(ValueError, match="store must be one of"):
        choose_store(CPU, 10, 10, "auto", store="ssd")


def test_delta_dtype_validation(tmp_path):
    with pytest.raises(ValueError, match="delta_dtype"):
        check_delta_dtype("bfloat16", 8 / 255)
    with pytest.raises(ValueError, match="int8"):
        check_delta_dtype("int8", 200 / 255)
    with pytest.raises(ValueError, match="int8"):  # refused before anything is read or written
        ue_fast.protect(tmp_path / "missing", tmp_path / "out", method="ops", delta_dtype="int8")
    assert not (tmp_path / "out").exists()


def test_store_shape_mismatch_refused():
    with pytest.raises(ValueError, match="shape"):
        _store(rows=4).load_state_dict(_store(rows=5).state_dict())


def test_auto_store_resumes_with_the_checkpoints_dtype(tmp_path, monkeypatch):
    """A run made with float16 (memory was short) resumes in float16 when memory is plenty."""
    from _helpers import protect_killed_after_checkpoint

    src = demo_subset(tmp_path / "in", per_class=4)
    settings = dict(SHORT, epochs=2, progress=False, device="cpu")
    monkeypatch.setattr(base_mod, "choose_store", lambda *a, **k: Placement(CPU, CPU, torch.float16))
    ue_fast.protect(src, tmp_path / "whole", **settings)
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=1, **settings)
    monkeypatch.undo()
    m = ue_fast.protect(src, tmp_path / "split", resume=True, **settings)
    assert m["delta_store"]["dtype"] == "float16"
    assert (tmp_path / "whole" / "poison.pt").read_bytes() == (tmp_path / "split" / "poison.pt").read_bytes()
