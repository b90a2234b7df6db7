"""The perturbation store between PGD passes and the 8-bit output rounding.

MI-UE's steps are 0.2/255 to 0.4/255. A store that rounds to whole grey levels after
every pass resets any net move under 0.5/255; these tests pin down that the default
store keeps such steps, that the int8 option rounds without bias, and that the output
rounding keeps sub-grey-level perturbations in expectation.
"""
import pytest
import torch

import ue_fast
import ue_fast.engine as engine_mod
from _helpers import demo_subset
from ue_fast.data import read_image_folder
from ue_fast.engine import BiLevelEngine, choose_store
from ue_fast.methods import MIUE, MIUEConfig
from ue_fast.protect import UnchangedImagesWarning, quantize

SHORT = dict(arch="cnn-small", epochs=1, pgd_steps=2, batch_size=16, poison_batch_size=64)  # 2 steps of 0.2/255


def _engine(data, **settings):
    cfg = MIUEConfig(**{**SHORT, **settings})
    return BiLevelEngine(MIUE(cfg, len(data.classes)), data.images, data.labels, len(data.classes), "cpu",
                         progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return read_image_folder(demo_subset(tmp_path_factory.mktemp("in"), per_class=8), progress=False)


def test_default_store_keeps_steps_below_half_a_grey_level(data):
    eng = _engine(data)
    assert eng.delta.dtype == torch.float32
    d = eng.run().delta * 255  # [N, 3, H, W] in grey levels
    assert float(d.abs().max()) <= 0.4 + 1e-4  # two steps of 0.2/255
    moved = d.abs() > 0.1
    assert moved.float().mean() > 0.5, "the sub-grey-level steps were lost"
    assert (d[moved] - d[moved].round()).abs().max() > 0.1  # not on the integer grid


def test_float16_store_follows_float32(data):
    d32 = _engine(data, delta_dtype="float32").run().delta
    eng = _engine(data, delta_dtype="float16")
    assert eng.delta.dtype == torch.float16
    d16 = eng.run().delta
    # same steps: float16 spacing within 8/255 is at most 0.008/255 (a step's sign may flip where |grad| ~ 0)
    close = (d16 - d32).abs() * 255 <= 0.01
    assert close.float().mean() > 0.99


def test_int8_store_rounds_stochastically_without_bias(data):
    eng = _engine(data, delta_dtype="int8")
    assert eng.delta.dtype == torch.int8
    eng._reseed_rounding(1)
    n = 20_000
    value = torch.full((n, 1, 1, 1), 0.3 / 255).expand(n, 3, 1, 1)  # a net move of 0.3 grey levels
    eng.delta = torch.zeros((n, 3, 1, 1), dtype=torch.int8)
    eng._store_delta(torch.arange(n), value)
    q = eng.delta.float()
    assert set(q.unique().tolist()) == {0.0, 1.0}
    p = float(q.mean())  # binomial: sd = sqrt(0.3 * 0.7 / 60000) ~ 0.0019
    assert abs(p - 0.3) < 0.01, f"rounded up with frequency {p}, expected 0.3"
    # bounds: an integer bound (eps, a pixel range) is never crossed
    eng._store_delta(torch.arange(n), torch.full((n, 3, 1, 1), 8 / 255))
    assert int(eng.delta.max()) == 8
    eng._store_delta(torch.arange(n), torch.full((n, 3, 1, 1), -7.5 / 255))
    assert set(eng.delta.unique().tolist()) == {-8, -7}


def test_int8_store_moves_where_round_to_nearest_would_not(data):
    d = _engine(data, delta_dtype="int8").run().delta * 255
    assert torch.equal(d, d.round())  # whole grey levels
    assert (d != 0).float().mean() > 0.1  # 0.4/255 of net move rounds up 40% of the time


def test_int8_resume_draws_the_same_rounding(tmp_path, monkeypatch, data):
    from _helpers import protect_killed_after_checkpoint

    src = demo_subset(tmp_path / "in", per_class=4)
    settings = dict(SHORT, epochs=3, delta_dtype="int8", progress=False, device="cpu")
    ue_fast.protect(src, tmp_path / "whole", **settings)
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=2, **settings)
    ue_fast.protect(src, tmp_path / "split", resume=True, **settings)
    assert (tmp_path / "whole" / "poison.pt").read_bytes() == (tmp_path / "split" / "poison.pt").read_bytes()


def test_choose_store(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine_mod, "_host_available_bytes", lambda: 1e12)
    assert choose_store(cpu, 3000, 3000, "auto") == (cpu, torch.float32)
    assert choose_store(cpu, 3000, 3000, "int8") == (cpu, torch.int8)
    # float32 perturbations would not fit half of the memory, float16 ones do
    monkeypatch.setattr(engine_mod, "_host_available_bytes", lambda: 2 * (1000 + 1000 * 3))
    assert choose_store(cpu, 1000, 1000, "auto") == (cpu, torch.float16)
    assert choose_store(cpu, 1000, 1000, "float32") == (cpu, torch.float32)  # asked for: kept


def test_delta_dtype_validation():
    with pytest.raises(ValueError, match="delta_dtype"):
        MIUEConfig(delta_dtype="bfloat16")
    with pytest.raises(ValueError, match="int8"):
        MIUEConfig(delta_dtype="int8", eps=200 / 255)


def test_auto_store_resumes_with_the_checkpoints_dtype(tmp_path, monkeypatch):
    """A run made with float16 (memory was short) resumes in float16 when memory is plenty."""
    from _helpers import protect_killed_after_checkpoint

    src = demo_subset(tmp_path / "in", per_class=4)
    settings = dict(SHORT, epochs=2, progress=False, device="cpu")
    monkeypatch.setattr(engine_mod, "choose_store", lambda *a: (torch.device("cpu"), torch.float16))
    ue_fast.protect(src, tmp_path / "whole", **settings)
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=1, **settings)
    monkeypatch.undo()
    m = ue_fast.protect(src, tmp_path / "split", resume=True, **settings)
    assert m["delta_store"]["dtype"] == "float16"
    assert (tmp_path / "whole" / "poison.pt").read_bytes() == (tmp_path / "split" / "poison.pt").read_bytes()


# -- the 8-bit output ------------------------------------------------------------------

def test_quantize_stochastic_is_unbiased_and_bounded(gen):
    clean = torch.randint(0, 256, (64, 3, 16, 16), generator=gen, dtype=torch.uint8)
    frac = torch.rand(clean.shape, generator=gen) * 2 - 1  # within one grey level
    delta = frac / 255
    out = quantize(clean, delta, 8, "stochastic", seed=1).to(torch.int16) - clean.to(torch.int16)
    inside = (clean > 0) & (clean < 255)  # away from the pixel-range clip
    assert (out[inside] - frac[inside]).abs().max() < 1  # floor or ceil of the value
    err = (out[inside].float() - frac[inside]).mean()  # unbiased: mean error ~ 0 (sd ~ 0.5/sqrt(n))
    assert abs(float(err)) < 0.01
    nearest = quantize(clean, delta, 8, "nearest").to(torch.int16) - clean.to(torch.int16)
    assert torch.equal(nearest[inside], frac[inside].round().to(torch.int16))
    # same seed, same output; another seed, another draw
    assert torch.equal(quantize(clean, delta, 8, seed=1), quantize(clean, delta, 8, seed=1))
    assert not torch.equal(quantize(clean, delta, 8, seed=1), quantize(clean, delta, 8, seed=2))


def test_quantize_keeps_whole_levels_and_the_budget():
    clean = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    # whole grey levels carried with float noise (as float16 stores them) stay exact
    delta = torch.tensor([8.0, -8.0, 3.0, 0.0]).repeat_interleave(12).view(1, 3, 4, 4) / 255
    noisy = (delta.half().float() + 1e-4 / 255)
    for _ in range(3):
        out = quantize(clean, noisy, 8, "stochastic", seed=_).to(torch.int16) - 100
        assert torch.equal(out, (delta * 255).round().to(torch.int16))
    # a budget that is not a whole number of grey levels: never exceeded
    out = quantize(clean, torch.full_like(delta, 8.5 / 255), 8.5, "nearest").to(torch.int16) - 100
    assert int(out.max()) == 8
    # the pixel range
    edge = torch.tensor([0, 255], dtype=torch.uint8).repeat(24).view(1, 3, 4, 4)
    out = quantize(edge, torch.full_like(delta, 0.9 / 255) * torch.where(edge == 0, -1, 1), 8, seed=0)
    assert torch.equal(out, edge)
    with pytest.raises(ValueError, match="rounding"):
        quantize(clean, delta, 8, "floor")


def test_quantize_shares_the_rounding_of_a_class(gen):
    """A class-wise perturbation stays one perturbation per class after rounding."""
    labels = torch.arange(12) % 3
    delta = (torch.rand(3, 3, 8, 8, generator=gen) * 6 - 3)[labels] / 255  # fractional, shared per class
    clean = torch.full((12, 3, 8, 8), 128, dtype=torch.uint8)
    d = quantize(clean, delta, 8, seed=0, shared=labels).to(torch.int16) - 128
    for c in range(3):
        assert all(torch.equal(d[i], d[c]) for i in range(c, 12, 3))
    assert not torch.equal(d, delta.mul(255).round().to(torch.int16))  # it did round stochastically
    per_image = quantize(clean, delta, 8, seed=0).to(torch.int16) - 128
    assert not all(torch.equal(per_image[i], per_image[0]) for i in range(0, 12, 3))


def test_short_run_changes_pixels_and_nearest_rounding_is_flagged(tmp_path):
    """The issue's case: one outer epoch of two 0.2/255 steps on real images."""
    src = demo_subset(tmp_path / "in", per_class=8)
    m = ue_fast.protect(src, tmp_path / "sto", progress=False, device="cpu", **SHORT)
    assert m["unchanged_images"] == 0 and m["linf_max_255"] == 1
    assert 0.1 < m["changed_pixels_fraction"] < 0.45  # ~ mean |delta| in grey levels (<= 0.4)
    assert m["changed_pixels_fraction"] == pytest.approx(m["mean_abs_delta_255"], abs=0.03)
    with pytest.warns(UnchangedImagesWarning, match=r"all 24 protected images .* at most 0.4/255"):
        m = ue_fast.protect(src, tmp_path / "near", progress=False, device="cpu", rounding="nearest", **SHORT)
    assert m["unchanged_images"] == 24 and m["linf_max_255"] == 0


def test_cli_exits_non_zero_when_no_image_changed(tmp_path, capsys):
    from ue_fast.cli import main

    src = demo_subset(tmp_path / "in", per_class=4)
    args = ["protect", str(src), str(tmp_path / "o"), "--arch", "cnn-small", "--epochs", "1", "--pgd-steps", "2",
            "--device", "cpu", "--no-progress", "--rounding", "nearest"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "warning: all 12 protected images are identical" in err and "error: no image changed" in err
    assert (tmp_path / "o" / "manifest.json").is_file()  # the outputs are still written
    assert main(args[:-2] + ["--overwrite"]) == 0  # stochastic rounding: pixels change
