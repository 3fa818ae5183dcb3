"""The training loop in-process on a tiny model: non-finite steps, schedule, summary."""

import json
import math

import pytest
import torch

from framework.config import load_config
from framework.training.factory import build_trainer
from framework.training.trainer import TrainingError
from tests.conftest import DEBUG_RECIPE, quick_overrides


def make_trainer(tmp_path, dataset, *extra):
    cfg = load_config(DEBUG_RECIPE, quick_overrides(tmp_path, dataset, steps=12) + list(extra))
    return build_trainer(cfg)


def poison_steps(monkeypatch, trainer, bad_steps):
    """Make the loss NaN at the given optimizer steps (numbered from 1), as a diverging model
    would."""
    real = trainer.objective.loss.head_loss

    def loss(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        bad = float("nan") if trainer.step + 1 in bad_steps else 1.0
        return total * bad, terms * bad

    monkeypatch.setattr(trainer.objective.loss, "head_loss", loss)


def snapshot(trainer):
    return [p.detach().clone() for p in trainer.engine.module.parameters()]


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nonfinite_loss_skips_the_step_and_is_counted(world, tmp_path, small_dataset,
                                                      monkeypatch, zero_stage):
    trainer = make_trainer(tmp_path, small_dataset, f"deepspeed.zero_stage={zero_stage}",
                           "train.max_consecutive_nonfinite=3")
    poison_steps(monkeypatch, trainer, {3, 4, 7})
    summary = trainer.fit()
    assert summary["status"] == "completed"
    assert summary["steps"] == 12 and summary["skipped_steps"] == 3
    assert [r.step for r in trainer.history if r.skipped] == [3, 4, 7]
    assert all(math.isfinite(p.sum().item()) for p in snapshot(trainer))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["skipped_steps"] == 3


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_skipped_step_leaves_parameters_unchanged(world, tmp_path, small_dataset, monkeypatch,
                                                  zero_stage):
    trainer = make_trainer(tmp_path, small_dataset, f"deepspeed.zero_stage={zero_stage}")
    poison_steps(monkeypatch, trainer, {2})
    trainer.train_step()
    before = snapshot(trainer)
    result = trainer.train_step()
    assert result.skipped and math.isnan(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(trainer)))
    result = trainer.train_step()  # the next good step trains again
    assert not result.skipped
    assert any(not torch.equal(a, b) for a, b in zip(before, snapshot(trainer)))


def test_consecutive_nonfinite_steps_stop_the_run(world, tmp_path, small_dataset, monkeypatch):
    trainer = make_trainer(tmp_path, small_dataset, "train.max_consecutive_nonfinite=3")
    poison_steps(monkeypatch, trainer, {2, 3, 4, 5})
    with pytest.raises(TrainingError, match="3 consecutive steps.*steps 2..4"):
        trainer.fit()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 3


def test_step_follows_schedule_and_logs_metrics(world, tmp_path, small_dataset):
    trainer = make_trainer(tmp_path, small_dataset, "schedule.warmup_steps=4",
                           "objective.variable_length_prob=0.5")
    summary = trainer.fit()
    lrs = [r.lr for r in trainer.history]
    assert lrs[:4] == pytest.approx([3e-3 * (i + 1) / 4 for i in range(4)])
    assert any(r.seq_len < 64 for r in trainer.history)  # some batches were cut
    assert summary["tokens"] == sum(16 * r.seq_len for r in trainer.history)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 12]
    assert all(r["train/grad_norm"] > 0 for r in records)


def test_checkpoints_carry_each_data_parallel_ranks_stream_position(world, tmp_path, small_dataset):
    trainer = make_trainer(tmp_path, small_dataset, "checkpoint.interval=6", "checkpoint.keep=1")
    trainer.fit()
    state_file = tmp_path / "checkpoints" / "step_00000012" / "data" / "dp_rank_00000.json"
    state = json.loads(state_file.read_text())
    assert (state["step"], state["handed"]) == (12, 0)  # every micro-batch of 12 steps, no more
    assert state["dp_size"] == 1 and len(state["streams"]) == 16  # one per sample of a step
    assert not (tmp_path / "checkpoints" / "step_00000006").exists()  # keep=1


def test_compiled_layers_train_as_eager_in_one_graph(world, tmp_path, small_dataset):
    """train.compile: every layer runs one compiled graph (shared, no graph break: megatron's
    row-parallel layers would break it at each call on rank 0), and trains as eager does."""
    from torch._dynamo.utils import counters

    losses = []
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        torch._dynamo.reset()
        counters.clear()
        trainer = make_trainer(tmp_path / name, small_dataset, *extra)
        losses.append([trainer.train_step().loss for _ in range(2)])
        trainer.data.close()
    assert counters["frames"]["ok"] == 1 and not counters["graph_break"]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
