"""The runner (``ue_fast.generation.runner``) with a toy method: stages in order, a record and
a checkpoint per step, exact resume from every checkpoint, early ends, refusals."""
import pytest
import torch

import ue_fast.generation.runner as runner_mod
from ue_fast.checkpoint import load_checkpoint, save_checkpoint
from ue_fast.generation import Runner, Stage


class Toy:
    """Two stages; every step draws from a seeded generator and adds to a running state."""

    name = "toy"
    classwise = False

    def __init__(self, steps=(2, 3), stop_at=None, seed=0):
        self.steps, self.stop_at, self.seed = steps, stop_at, seed
        self.calls = []

    def settings(self):
        return {"steps": list(self.steps), "seed": self.seed}

    def setup(self, ctx, images, labels, num_classes):
        self.ctx, self.n = ctx, len(images)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.total = torch.zeros(self.n, 3, 2, 2)

    def stages(self):
        return [Stage("warm-up", self.steps[0], self.warm, key="pretrain_epoch"),
                Stage("rounds", self.steps[1], self.round)]

    def _draw(self):
        self.total += torch.rand(self.total.shape, generator=self.gen)

    def warm(self, i):
        self.calls.append(("warm", i))
        self._draw()
        return {"train_s": 0.0}

    def round(self, i):
        self.calls.append(("round", i))
        self._draw()
        return {"train_s": 0.0, "poison_s": 0.0, "finished": self.stop_at == i}

    def state_dict(self):
        return {"gen": self.gen.get_state(), "total": self.total.clone()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.total = state["total"].clone()

    def perturbations(self):
        return self.total.clone()


def _data(n=4):
    return torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n) % 2


def _run(method, path=None, resume=False):
    return Runner(method, *_data(), 2, checkpoint_path=path, progress=False).run(resume=resume)


def test_stages_run_in_order_with_a_record_per_step():
    m = Toy()
    res = _run(m)
    assert m.calls == [("warm", 1), ("warm", 2), ("round", 1), ("round", 2), ("round", 3)]
    assert [h.get("pretrain_epoch", h.get("epoch")) for h in res.history] == [1, 2, 1, 2, 3]
    assert all(h["finished"] is False and h["images_per_s"] > 0 for h in res.history)
    assert res.resumed_from == 0 and res.delta.shape == (4, 3, 2, 2)


def test_a_finished_record_ends_its_stage():
    m = Toy(steps=(1, 5), stop_at=2)
    res = _run(m)
    assert m.calls == [("warm", 1), ("round", 1), ("round", 2)]
    assert res.history[-1]["finished"] is True


@pytest.mark.parametrize("die_at", [1, 2, 3, 4])
def test_resume_from_every_checkpoint_equals_the_uninterrupted_run(tmp_path, monkeypatch, die_at):
    whole = _run(Toy())
    real, calls = runner_mod.save_checkpoint, []

    def save_then_die(path, state):
        real(path, state)
        calls.append(1)
        if len(calls) == die_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(Toy(), tmp_path / "c.pt")
    monkeypatch.undo()
    m = Toy()
    res = _run(m, tmp_path / "c.pt", resume=True)
    assert len(m.calls) == 5 - die_at  # only the steps not yet done
    assert torch.equal(res.delta, whole.delta)
    assert [h.get("epoch") for h in res.history] == [h.get("epoch") for h in whole.history]
    assert res.resumed_from == max(0, die_at - 2)  # rounds (records with "epoch") done before


def test_resume_of_a_finished_run_runs_nothing(tmp_path):
    _run(Toy(), tmp_path / "c.pt")
    m = Toy()
    _run(m, tmp_path / "c.pt", resume=True)
    assert m.calls == []


def test_resume_refuses_other_settings_method_data_and_format(tmp_path):
    _run(Toy(), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"settings differ.*'seed': \(0, 1\)"):
        _run(Toy(seed=1), tmp_path / "c.pt", resume=True)
    with pytest.raises(ValueError, match="delta_dtype"):
        Runner(Toy(), *_data(), 2, checkpoint_path=tmp_path / "c.pt", progress=False,
               delta_dtype="float16").run(resume=True)
    other = Toy()
    other.name = "other"
    with pytest.raises(ValueError, match="of method 'toy', not 'other'"):
        _run(other, tmp_path / "c.pt", resume=True)
    with pytest.raises(ValueError, match="other images"):
        Runner(Toy(), *_data(6), 2, checkpoint_path=tmp_path / "c.pt", progress=False).run(resume=True)
    state = load_checkpoint(tmp_path / "c.pt")
    torch.save({**state, "format": 1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="format 1 .*earlier ue_fast.*start the run anew"):
        _run(Toy(), tmp_path / "old.pt", resume=True)
    save_checkpoint(tmp_path / "ok.pt", {"x": 1})
    assert load_checkpoint(tmp_path / "ok.pt")["x"] == 1


def test_progress_line_per_step_in_a_log(capsys):
    Runner(Toy(), *_data(), 2, progress=True).run()
    err = capsys.readouterr().err
    assert "toy warm-up" in err and "toy rounds" in err and "\r" not in err
