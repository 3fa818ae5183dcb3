"""The faults the tests inject (framework/training/faults.py): parsed from LLADA_FAULTS, wrapped
around a built trainer's own methods, nothing otherwise; a malformed entry names itself."""

import types

import pytest

from framework.training import faults


class FakeTrainer:
    def __init__(self, rank, step):
        self.world = types.SimpleNamespace(rank=rank)
        self.step = step
        self.checkpoints = types.SimpleNamespace(checkpointer=types.SimpleNamespace(
            _complete=lambda *args: ("completed", args[0])))

    def _next_batch(self):
        return f"batch of step {self.step + 1}"


def test_malformed_faults_are_named():
    for bad in ("hang=1", "stall=1:2", "save_delay=:3", "hang=a:3"):
        with pytest.raises(ValueError, match=f"LLADA_FAULTS: '{bad}' is not one of"):
            faults.faults({faults.ENV: bad})
    assert faults.faults({faults.ENV: " hang=1:6 , save_delay=10:0.5"}) == {
        "hang": (1, 6.0), "save_delay": (10, 0.5)}
    assert faults.faults({}) == {}


def test_a_hang_is_wrapped_around_the_named_rank_of_a_fresh_start_only(monkeypatch):
    hung = []
    monkeypatch.setattr(faults, "hang_forever", lambda rank, step: hung.append((rank, step)))
    env = {faults.ENV: "hang=1:3"}
    other, fresh, resumed = FakeTrainer(0, 0), FakeTrainer(1, 0), FakeTrainer(1, 2)
    for t in (other, fresh, resumed):
        faults.install(t, env)
    assert "_next_batch" not in vars(other) and "_next_batch" not in vars(resumed)
    fresh.step = 1
    assert fresh._next_batch() == "batch of step 2" and not hung
    fresh.step = 2
    assert fresh._next_batch() == "batch of step 3" and hung == [(1, 3)]


def test_a_save_delay_holds_back_that_steps_background_write(monkeypatch):
    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    trainer = FakeTrainer(0, 0)
    faults.install(trainer, {faults.ENV: "save_delay=4:2.5"})
    complete = trainer.checkpoints.checkpointer._complete
    args = ("tmp", "final", {}, {}, {}, "writer")
    assert complete(2, *args, "captured") == ("completed", 2) and slept == []
    assert complete(4, *args, None) == ("completed", 4) and slept == []  # a synchronous save
    assert complete(4, *args, "captured") == ("completed", 4) and slept == [2.5]
