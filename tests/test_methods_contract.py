"""The contract every registered generator keeps, through ``ue_fast.protect`` on real images.

Parametrised over ``ue_fast.methods.METHODS`` (a method missing from ``TINY`` fails the
first test): every pixel within the budget and some moved, labels kept; the same seed
gives the same bytes and another seed other bytes; a run killed right after any of its
checkpoints (every step of every stage) and resumed gives the bytes of the uninterrupted
run; the manifest's fields; progress as plain lines in a log.
"""
import json

import pytest
import torch

import ue_fast
from _helpers import demo_subset, protect_killed_after_checkpoint
from ue_fast.data import read_image_folder
from ue_fast.data.exports import load_delta_npy
from ue_fast.methods import METHODS
from ue_fast.methods.base import SurrogateMethod

FAST = dict(arch="cnn-small", batch_size=16, poison_batch_size=32)
# Tiny schedules: (settings, checkpoints the run writes).
TINY = {
    "miue": (dict(FAST, epochs=2, pgd_steps=2), 2),
    "em": (dict(FAST, epochs=2, pgd_steps=2, train_steps=2, stop_acc=1.0), 2),
    "em-classwise": (dict(FAST, epochs=2, pgd_steps=2, train_steps=2, stop_acc=1.0), 2),
    "ap": (dict(FAST, pretrain_epochs=2, pgd_steps=3, restarts=2), 4),
    "tap": (dict(FAST, pretrain_epochs=1, pgd_steps=3, restarts=2, epochs=2), 5),
    "rem": (dict(FAST, epochs=2, pgd_steps=2, adv_steps=1, eot_samples=2), 3),
    "bayes": (dict(FAST, epochs=2, retrain_epochs=1, adam_lr=4e-3), 2),
    "ops": ({}, 1),
    "lsp": ({}, 1),
    "ar": ({}, 1),
    "cuda": ({}, 1),
    "hypo": (dict(FAST, pretrain_epochs=2, pretrain_adv_steps=1, pgd_steps=3), 3),
    "pil": (dict(FAST, arch="linear", pretrain_epochs=2, pgd_steps=3), 3),
    "sep": (dict(FAST, pretrain_epochs=2, members=2, pgd_steps=2, vr_steps=2), 3),
    "aue": (dict(FAST, epochs=2, pgd_steps=2), 2),
    # lr 0.1: AAP's 0.5 blows the surrogate up at batch 16
    "aap": (dict(FAST, pretrain_epochs=2, pretrain_warmup=1, pgd_steps=3, lr=0.1), 3),
}
NAMES = sorted(METHODS)
QUIET = dict(progress=False, device="cpu")


def _protect(src, out, name, **extra):
    if METHODS[name].keyed:  # a keyed method draws a fresh key unless given one
        extra.setdefault("seed", 7)
    return ue_fast.protect(src, out, method=name, **QUIET, **TINY[name][0], **extra)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("in"), per_class=12)


@pytest.fixture(scope="module")
def runs(src, tmp_path_factory):
    """One uninterrupted run per method: {name: (output folder, manifest)}."""
    out = {}
    for name in NAMES:
        o = tmp_path_factory.mktemp(name) / "p"
        out[name] = (o, _protect(src, o, name))
    return out


def test_every_method_has_a_tiny_schedule():
    assert sorted(TINY) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_within_budget_labels_kept_and_perturbed(runs, src, name):
    out, m = runs[name]
    clean, prot = read_image_folder(src, progress=False), read_image_folder(out, progress=False)
    assert prot.labels.tolist() == clean.labels.tolist()
    assert [p.rsplit(".", 1)[0] for p in prot.paths] == [p.rsplit(".", 1)[0] for p in clean.paths]
    diff = prot.images.to(torch.int16) - clean.images.to(torch.int16)
    assert 0 < int(diff.abs().max()) <= round(m["settings"]["eps_255"])
    assert torch.equal(load_delta_npy(out / m["perturbation_npy"]).to(torch.int16), diff)
    if METHODS[name].classwise:  # one perturbation per class (before the per-image pixel clip)
        d = torch.load(out / "poison.pt", weights_only=True)
        for c in clean.labels.unique():
            rows = d[clean.labels == c]
            inner = (clean.images[clean.labels == c].float() / 255 - 0.5).abs() < 0.45  # no clip there
            agree = ((rows - rows[:1]).abs() < 1.5 / 255) | ~(inner & inner[:1])
            assert agree.float().mean() > 0.99


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_other_seed_other_bytes(runs, src, tmp_path, name):
    out, m = runs[name]
    _protect(src, tmp_path / "again", name)
    npy = m["perturbation_npy"]
    assert (tmp_path / "again" / npy).read_bytes() == (out / npy).read_bytes()
    other = _protect(src, tmp_path / "seed", name, seed=123)
    assert other["seed"] == (None if METHODS[name].keyed else 123)  # a key stays out of the outputs
    if name != "ops":  # OPS is a deterministic search: it draws nothing
        assert (tmp_path / "seed" / npy).read_bytes() != (out / npy).read_bytes()


@pytest.mark.parametrize("name, die_at", [(n, k) for n in NAMES for k in range(1, TINY[n][1] + 1)])
def test_resume_after_a_kill_at_every_checkpoint_equals_uninterrupted(runs, src, tmp_path, monkeypatch, name,
                                                                      die_at):
    out, whole = runs[name]
    key = {"seed": 7} if METHODS[name].keyed else {}
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=die_at, method=name, **QUIET,
                                    **TINY[name][0], **key)
    assert (tmp_path / "split" / ".ue_fast" / "checkpoint.pt").is_file()
    assert not (tmp_path / "split" / "manifest.json").exists()
    m = _protect(src, tmp_path / "split", name, resume=True)
    done_before = sum("epoch" in h for h in whole["history"][:die_at])
    assert m["resumed_from_epoch"] == done_before
    npy = whole["perturbation_npy"]
    assert (tmp_path / "split" / npy).read_bytes() == (out / npy).read_bytes()
    assert len(m["history"]) == len(whole["history"]) == TINY[name][1]


@pytest.mark.parametrize("name", NAMES)
def test_manifest_fields(runs, name):
    out, m = runs[name]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["method"] == name and on_disk["num_images"] == 36 and len(on_disk["files"]) == 36
    cfg = METHODS[name].config_class
    assert set(cfg.names()) <= set(on_disk["settings"]) and {"eps_255", "compile", "delta_dtype"} <= set(
        on_disk["settings"])
    for key in ("seed", "budget", "key", "device", "versions", "classes", "counts", "linf_max_255", "mean_abs_delta_255",
                "changed_pixels_fraction", "unchanged_images", "rounding", "delta_store", "history",
                "resumed_from_epoch", "timings_s", "generation_s", "rounds", "images_per_s", "total_s"):
        assert key in on_disk, key
    assert on_disk["rounds"] == sum("epoch" in h for h in on_disk["history"]) >= 1
    assert all(h["finished"] in (True, False) for h in on_disk["history"])
    assert on_disk["images_per_s"] > 0 and on_disk["timings_s"]["writing"] >= 0
    # each output's own seconds within the writing, beside the rounding (written ones only)
    assert {"rounding", "images", "npy"} <= set(on_disk["writing_s"]) <= {"rounding", *on_disk["outputs"], "images",
                                                                          "npy", "poison.pt", "poison_classwise.pt"}
    assert all(v >= 0 for v in on_disk["writing_s"].values())
    if METHODS[name].lp:
        assert on_disk["budget"] == {"kind": "linf", "eps_255": on_disk["settings"]["eps_255"], "holds": True}
    else:  # the method's own bound, checked
        assert on_disk["budget"]["kind"] != "linf" and on_disk["budget"]["holds"] is True
    assert (on_disk["key"] is not None) == METHODS[name].keyed


@pytest.mark.parametrize("name", ["miue", "ap", "ops"])
def test_progress_in_a_log_is_plain_lines(src, tmp_path, capsys, name):
    ue_fast.protect(src, tmp_path / "o", method=name, device="cpu", progress=True, **TINY[name][0])
    err = capsys.readouterr().err
    assert f"{name} " in err and "\r" not in err


def test_a_new_method_is_a_file_and_a_registry_line(src, tmp_path, monkeypatch):
    """What a new surrogate method needs: a config, a class with ``stages()`` over the blocks, and
    its line in ``METHODS``; the runner, protect, the CLI, checkpoints and resume need nothing.
    Here: error-maximising noise (a surrogate trained on x + delta, PGD ascending its loss)."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from ue_fast.cli import main as cli_main
    from ue_fast.generation import Stage
    from ue_fast.methods import SurrogateMethod
    from ue_fast.methods.settings import SurrogateConfig

    @dataclass
    class MaxConfig(SurrogateConfig):
        epochs: int = 2

    class ErrorMaximising(SurrogateMethod):
        name = "error-max"
        config_class = MaxConfig

        def stages(self):
            return [Stage("rounds", self.config.epochs, self.round)]

        def round(self, r):
            cfg = self.config
            train = self.surrogate.fit(self.data.shuffled(cfg.batch_size), self.perturbed_inputs(), lr=cfg.lr)
            poison = self.pgd.per_batch(self.data.shuffled(cfg.poison_batch_size),
                                        lambda f, logits, y: F.cross_entropy(logits.float(), y),
                                        steps=cfg.pgd_steps, step_size=cfg.alpha, maximize=True)
            return {**train, **poison}

    monkeypatch.setitem(METHODS, "error-max", ErrorMaximising)
    assert cli_main(["protect", str(src), str(tmp_path / "o"), "--method", "error-max", "--set", "arch=cnn-small",
                     "--set", "pgd_steps=2", "--device", "cpu", "--no-progress"]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["method"] == "error-max" and m["rounds"] == 2 and 0 < m["linf_max_255"] <= 8
    protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", method="error-max", arch="cnn-small",
                                    pgd_steps=2, **QUIET)
    resumed = ue_fast.protect(src, tmp_path / "split", method="error-max", arch="cnn-small", pgd_steps=2,
                              resume=True, **QUIET)
    assert resumed["resumed_from_epoch"] == 1
    assert (tmp_path / "split" / "poison.pt").read_bytes() == (tmp_path / "o" / "poison.pt").read_bytes()


ROBUST_NAMES = [n for n in NAMES if issubclass(METHODS[n], SurrogateMethod) and n != "sep"]


@pytest.mark.parametrize("name", ROBUST_NAMES)
def test_robust_wraps_every_surrogate_method(runs, src, tmp_path, monkeypatch, name):
    """--robust on every surrogate method it applies to (all but sep; bayes per batch): within
    the budget, another perturbation than the plain run's, and killed after its first
    checkpoint and resumed, the bytes of the uninterrupted run."""
    from ue_fast.methods.robust import RobustExperimentalWarning

    extra = dict(robust="jpeg,grayscale,bdr", robust_settings={"share": 1, "surrogate": True})
    if name == "bayes":  # its whole-set pass is refused; the per-batch pass takes the defences
        extra.update(ascent="sign", whole_set=False)
    if METHODS[name].keyed:
        extra["seed"] = 7
    with pytest.warns(RobustExperimentalWarning):
        m = _protect(src, tmp_path / "whole", name, **extra)
    assert m["budget"]["holds"] and m["settings"]["robust"] == ["jpeg", "grayscale", "bdr"]
    assert "defences" in m["timings_s"]  # surrogate=true: its training inputs were defended
    npy = m["perturbation_npy"]
    assert (tmp_path / "whole" / npy).read_bytes() != (runs[name][0] / npy).read_bytes()
    with pytest.warns(RobustExperimentalWarning):
        protect_killed_after_checkpoint(monkeypatch, src, tmp_path / "split", die_at=1, method=name, **QUIET,
                                        **TINY[name][0], **extra)
        resumed = _protect(src, tmp_path / "split", name, resume=True, **extra)
    assert resumed["resumed_from_epoch"] == sum("epoch" in h for h in m["history"][:1])
    assert (tmp_path / "split" / npy).read_bytes() == (tmp_path / "whole" / npy).read_bytes()
